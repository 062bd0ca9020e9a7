"""megatron-core's sample-index cache on a multi-node job: a shared --data-cache-path is built once (by rank 0),
a node-local one once per node. Two forked ranks play two nodes (each its own LOCAL_RANK 0)."""

import os
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import run_distributed
from helpers.offline import SEQ, make_cfg, make_dataset

SIZES = [200, 8, 0]


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    d = tmp_path_factory.mktemp("index_cache")
    return ["0.7", make_dataset(d / "a", 1), "0.3", make_dataset(d / "b", 2, num_docs=30)]


def _samples(blend, cache: str, node_local: bool):
    import torch.distributed as dist

    from megatron_slm.data.datasets import build_datasets, dataset_config
    from megatron_slm.training.resolve import resolve_run

    if node_local:  # each rank is the first rank of its own node, with its own disk
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = "0", "1"
        cache = f"{cache}/node{os.environ['RANK']}"
    dist.init_process_group("gloo")
    cfg = make_cfg(blend, train=dict(train_iters=100), data=dict(data_cache_path=cache))
    ds_cfg = dataset_config(cfg.data, SEQ, 5, resolve_run(cfg).data)
    train = build_datasets(ds_cfg, SIZES)[0]
    files = sorted(p.name for p in Path(cache).iterdir())
    return [np.asarray(train[i]["tokens"]).tolist() for i in range(len(train))], files


def _single_process(blend, cache):
    import torch.distributed as dist

    from megatron_slm.data.datasets import build_datasets, dataset_config
    from megatron_slm.training.resolve import resolve_run

    dist.init_process_group("gloo")  # megatron-core's blended index builder asks for a rank
    cfg = make_cfg(blend, train=dict(train_iters=100), data=dict(data_cache_path=cache))
    train = build_datasets(dataset_config(cfg.data, SEQ, 5, resolve_run(cfg).data), SIZES)[0]
    return [np.asarray(train[i]["tokens"]).tolist() for i in range(len(train))]


def test_node_local_caches_are_built_on_every_node(blend, tmp_path):
    # megatron-core alone: node 1's rank finds no indices in its own cache and fails to load them
    (expected,) = run_distributed(_single_process, 1, blend, str(tmp_path / "alone"))
    ranks = run_distributed(_samples, 2, blend, str(tmp_path / "local"), True)
    for samples, files in ranks:
        assert samples == expected  # both nodes read the same samples as one process
        assert any(f.endswith("sample_index.npy") for f in files) and not any(f.startswith(".rank0") for f in files)


def test_a_shared_cache_is_built_once(blend, tmp_path):
    ranks = run_distributed(_samples, 2, blend, str(tmp_path / "shared"), False)
    (samples0, files0), (samples1, files1) = ranks
    assert samples0 == samples1 and files0 == files1
