"""A VPN server on a private address behind masqd (issue 8, SPEC 5), with real peers.

IPsec: a libreswan gateway on 10.0.0.2 behind masqd (``ipmasqadm portfw`` UDP 500
on the WAN symbol + ``ipfwd --masq 10.0.0.2 50``), two remote libreswan
initiators connecting to 203.0.113.200 at the same time with raw ESP (one IKEv1,
one IKEv2; encapsulation=no, @ids), while a LAN client (10.0.0.11) calls out to
a remote gateway. PPTP: pptpd on 10.0.0.2 behind masqd (``ipportfw`` TCP 1723 +
``ipfwd --masq 10.0.0.2 47``) called by two remote pptp-linux clients while a
LAN client (10.0.0.11) calls out to a remote pptpd at the same time (the Linux
2.0 patch could do one or the other, not both). The checks read the peers'
results, the WAN capture and masqd's own table and counters.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import catalog
from .harness.scenario import run_scenario

pytestmark = pytest.mark.interop


def test_ipsec_gateway_behind_masqd_two_remote_clients(guest_images: dict[str, Path]) -> None:
    """Remote client r1 speaks IKEv1, r2 IKEv2 (one run covers both). Both remote tunnels up; pings through each tunnel from the client side and from the
    gateway side; ISAKMP answers leave from 203.0.113.200:500 and ESP from 203.0.113.200 to
    both clients; masqd's table shows the UDP 500 forward and the ESP forward with hits. At
    the same time a LAN libreswan client (10.0.0.11) reaches a remote gateway through the
    IPsec masquerade (its ESP pair learned in masqd's table)."""
    run = run_scenario(catalog.ipsec_gateway_behind_masqd(ike=(1, 2), clients=2, lan_clients=1))
    assert run.passed, run.report()


def test_pptpd_behind_masqd_and_lan_client_calling_out(guest_images: dict[str, Path]) -> None:
    """Three PPP links at once, each pinging through itself: two remote clients to the forwarded
    pptpd (portfw 1723 hits; the PPTP helper follows the forwarded server's calls from the
    control channel and leaves their Call IDs alone) and one LAN client to a remote pptpd
    (Call-ID masquerade); GRE leaves from 203.0.113.200 to all three far ends."""
    run = run_scenario(catalog.pptp_server_behind_masqd(remote_clients=2, lan_clients=1))
    assert run.passed, run.report()


# ------------------------------------------------ no guests: the config and the checks themselves

_LAN_WAN = """
[lan]
name = "x-mlan"
address = "10.0.0.1/8"
[wan]
name = "x-mwan"
address = "203.0.113.200/24"
gateway = "203.0.113.1"
"""


def _forwards(toml: str) -> tuple[list[tuple[str, str, int, str, int]], list[tuple[int, str]]]:
    from masqd.config import loads
    from masqd.firewall import build_ruleset

    rs = build_ruleset(loads(toml, "test"))
    pf = sorted((f.proto, f.listen, f.port, str(f.to), f.to_port) for f in rs.portfw)
    return pf, sorted((p.proto, str(p.to)) for p in rs.protofw)


def test_readme_vpn_server_config_is_what_the_interop_tests_run() -> None:
    """The docs' "VPN server on a private address" block (docs/vpn.md) parses to exactly the forwards the
    two scenarios above configure, all on the WAN symbol."""
    readme = (Path(__file__).parents[2] / "docs" / "vpn.md").read_text()
    section = readme[readme.index("**A VPN server on a private address.**"):]
    block = section[section.index("```toml\n") + 8: section.index("```\n", section.index("```toml\n") + 8)]
    tested = catalog.IPSEC_SERVER_RULES + catalog.PPTP_SERVER_RULES
    want = _forwards(_LAN_WAN + '[firewall]\nrules = """\n' + tested + '"""\n')
    assert _forwards(_LAN_WAN + block) == want
    pf, protofw = want
    assert [(p, port) for p, _l, port, _t, _tp in pf] == [("tcp", 1723), ("udp", 500)]
    assert {listen for _p, listen, *_ in pf} <= {"wan", "$WAN", "${4}"}
    assert protofw == [(47, "10.0.0.2"), (50, "10.0.0.2")]


def test_forward_and_pptp_call_checks_read_the_snapshot(tmp_path: Path) -> None:
    from .checks import masqd_forward_hits, masqd_pptp_calls
    from .harness.peers import PeerSpec
    from .harness.scenario import Scenario, ScenarioRun

    spec = PeerSpec("r1", "strongswan", "rem", "198.51.100.41/24", None, "client", "")
    run = ScenarioRun(Scenario("t", (spec,)), "mitest", tmp_path)
    assert masqd_forward_hits("portfw", "10.0.0.2:500", "udp", 1)(run) != []  # no snapshot
    run.masqd_state = {"table": [
        {"proto": "portfw", "lan": "10.0.0.2:500", "remote": "udp", "hits": 2},
        {"proto": "protofw", "lan": "10.0.0.2", "remote": "esp", "hits": 0},
        {"proto": "gre", "lan": "10.0.0.2:128", "inbound": True, "state": "ESTABLISHED",
         "lan_call_id": 128, "masq_call_id": 128},
        {"proto": "gre", "lan": "10.0.0.11:7", "inbound": False, "state": "ESTABLISHED",
         "lan_call_id": 7, "masq_call_id": 9},
    ]}  # fmt: skip
    assert masqd_forward_hits("portfw", "10.0.0.2:500", "udp", 2)(run) == []
    assert masqd_forward_hits("portfw", "10.0.0.2:500", "udp", 3)(run) != []
    assert masqd_forward_hits("protofw", "10.0.0.2", "esp", 0)(run) == []
    assert masqd_forward_hits("protofw", "10.0.0.2", "esp", 1)(run) != []
    assert masqd_forward_hits("protofw", "10.0.0.2", "gre", 0)(run) != []  # no such row
    assert masqd_pptp_calls("10.0.0.2", True, 1, masqueraded_ids=False)(run) == []
    assert masqd_pptp_calls("10.0.0.2", True, 2, masqueraded_ids=False)(run) != []
    assert masqd_pptp_calls("10.0.0.11", False, 1, masqueraded_ids=True)(run) == []
    assert masqd_pptp_calls("10.0.0.11", False, 1, masqueraded_ids=False)(run) != []  # 7 -> 9
