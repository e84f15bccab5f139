"""masqd.interop: real VPN peers (User-Mode Linux guests) around masqd for the interop suite."""
