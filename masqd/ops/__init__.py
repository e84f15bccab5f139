"""Operations around a running masqd: metrics, logs, the control socket, reload, capture, WAN address.

``metrics`` (Prometheus), ``logging`` (structlog JSON), ``control`` (the unix
socket and its client), ``cli`` (the operator subcommands), ``reload``,
``pcap``, ``wanwatch`` (the WAN address source), ``runtime`` (starts them all
beside the data plane).

May import: ``masqd.dataplane`` and the layers below it, prometheus_client,
structlog, pyroute2, asyncio and the standard library; not the cli or the lab.
"""
