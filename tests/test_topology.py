"""Golden tests: affinity strings and masks derived from the node model."""

import dataclasses

import pytest

from parsl_aurora import topology
from parsl_aurora.errors import ConfigError
from parsl_aurora.topology import AURORA

# Typed in by hand on ALCF's page, before Aurora reserved cores 0 and 52.
PAGE_AFFINITY = (
    "list:0-7,104-111:8-15,112-119:16-23,120-127:24-31,128-135:32-39,136-143:40-47,144-151:"
    "52-59,156-163:60-67,164-171:68-75,172-179:76-83,180-187:84-91,188-195:92-99,196-203"
)
AURORA_AFFINITY = (
    "list:1-8,105-112:9-16,113-120:17-24,121-128:25-32,129-136:33-40,137-144:41-48,145-152:"
    "53-60,157-164:61-68,165-172:69-76,173-180:77-84,181-188:85-92,189-196:93-100,197-204"
)


def test_aurora_node():
    assert (AURORA.cpus, AURORA.tiles, AURORA.reserved_cores) == (208, 12, (0, 52))


def test_page_affinity_byte_for_byte():
    assert topology.cpu_affinity(dataclasses.replace(AURORA, reserved_cores=())) == PAGE_AFFINITY


def test_aurora_affinity_skips_reserved_cores():
    assert topology.cpu_affinity(AURORA) == AURORA_AFFINITY


def test_rank_binding_matches_alcf_recommendation():
    assert topology.rank_cpu_bind(AURORA) == (
        "list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100")


def test_tile_names():
    assert topology.tile_names(AURORA) == [f"{g}.{t}" for g in range(6) for t in range(2)]


def test_worker_cpus_stay_on_the_tiles_socket():
    for w, cpus in enumerate(topology.worker_cpus(AURORA)):
        socket = 0 if w < 6 else 1
        assert all((c % 104) // 52 == socket for c in cpus)
        assert not {0, 52, 104, 156} & set(cpus)


@pytest.mark.parametrize("rank,composite,flat", [
    (0, "0.0", "0"), (1, "0.1", "1"), (2, "1.0", "2"), (11, "5.1", "11"), (12, "0.0", "0"),
])
def test_ze_affinity_mask(rank, composite, flat):
    assert topology.ze_affinity_mask(AURORA, rank) == composite
    assert topology.ze_affinity_mask(AURORA, rank, "FLAT") == flat


def test_bad_hierarchy_names_choices():
    with pytest.raises(ConfigError, match="hierarchy='TILE'.*COMPOSITE, FLAT"):
        topology.ze_affinity_mask(AURORA, 0, "TILE")


def test_too_many_cores_per_worker():
    with pytest.raises(ConfigError, match="cores_per_worker=9"):
        topology.cpu_affinity(AURORA, cores_per_worker=9)


def test_local_reads_this_machine():
    import os

    node = topology.local(gpus=6, tiles_per_gpu=2)
    assert node.cpus == len(os.sched_getaffinity(0))
    assert node.tiles == 12
