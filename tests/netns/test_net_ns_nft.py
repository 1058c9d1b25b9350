"""libnftables wrapper inside a namespace: tables, maps, element batches, errors, cleanup."""

import pytest

from ipshift.net.nft import Nft, NftError

pytestmark = pytest.mark.netns


def test_table_map_elements_in_a_namespace(lab):
    host_tables_before = Nft().tables()
    n = lab.host("n")
    with Nft(n.ns) as nft:
        assert nft.tables() == []
        nft.ensure_table("inet", "ipshift_t")
        nft.ensure_table("inet", "ipshift_t")  # idempotent
        assert nft.table_exists("inet", "ipshift_t")
        nft.run_json([
            {"add": {"map": {"family": "inet", "table": "ipshift_t", "name": "flows",
                             "type": ["ipv4_addr", "inet_service"], "map": "ipv4_addr"}}},
            {"add": {"set": {"family": "inet", "table": "ipshift_t", "name": "dead",
                             "type": "ipv4_addr"}}},
        ])
        items = {(f"198.51.100.{i % 250 + 1}", 1024 + i): "203.0.113.1" for i in range(1500)}
        assert nft.add_map_elements("inet", "ipshift_t", "flows", items, batch=500) == 1500
        assert nft.add_elements("inet", "ipshift_t", "dead", ["192.0.2.1", "192.0.2.2"]) == 2

        doc = nft.list_table("inet", "ipshift_t")
        maps = [x["map"] for x in doc["nftables"] if "map" in x]
        assert len(maps[0]["elem"]) == 1500
        # the nft CLI in the namespace sees the same
        assert "198.51.100.1 . 1024 : 203.0.113.1" in n.run(
            ["nft", "list", "map", "inet", "ipshift_t", "flows"]).stdout

        removed = list(items)[:100]
        assert nft.delete_elements("inet", "ipshift_t", "flows", removed) == 100
        doc = nft.list_table("inet", "ipshift_t")
        assert len(next(x["map"] for x in doc["nftables"] if "map" in x)["elem"]) == 1400
        nft.flush_set("inet", "ipshift_t", "dead")

        echoed = nft.run_json([{"add": {"chain": {"family": "inet", "table": "ipshift_t",
                                                  "name": "c"}}}], echo=True)
        assert isinstance(echoed["nftables"][0]["add"]["chain"]["handle"], int)

        with pytest.raises(NftError) as info:
            nft.add_map_elements("inet", "ipshift_t", "nosuchmap", {("192.0.2.1", 1): "192.0.2.2"})
        assert "No such file or directory" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(NftError, match="syntax error"):
            nft.run("add rule inet ipshift_t c this is not nft")

        assert nft.delete_table("inet", "ipshift_t") is True
        assert nft.delete_table("inet", "ipshift_t") is False
        with pytest.raises(NftError):
            nft.delete_table("inet", "ipshift_t", missing_ok=False)
        assert nft.tables() == []
    # nothing leaked into the test runner's own namespace
    assert Nft().tables() == host_tables_before


def test_closed_context_refuses_calls(lab):
    n = lab.host("n")
    nft = Nft(n.ns)
    nft.close()
    nft.close()
    with pytest.raises(Exception):  # noqa: B017 - worker closed or context closed
        nft.run("list tables")
