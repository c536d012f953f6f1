"""What a node holds when a ClientApp message arrives: peak RSS above the baseline of one
``disco_fl.fl.client_app._setup`` call (the step before training: check the message, rebuild the
plan and the node's shard), for ResNet-18 (``ModelSpec("resnet18", in_channels=1,
image_size=28)``, N = 2, shard 0), in a fresh process, 1 torch thread.

Usage (the code measured is the one on ``PYTHONPATH``; compare two checkouts)::

    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=. python bench/clientapp_setup_mem.py
"""

from __future__ import annotations

import gc
import json

import torch
from train import _baseline_mb, _peak_mb, _status_mb  # bench/train.py: the same memory measure


def main() -> None:
    torch.set_num_threads(1)
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import disco_fl.fl.client_app as ca
    from disco_fl.fl.federated import ModelSpec
    from disco_fl.fl.server import DiscoStrategy, NodeInfo, build_roster

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    spec = ModelSpec(name="resnet18", num_nodes=2, in_channels=1, image_size=28)
    s = DiscoStrategy(spec, steps=1, batch_size=4)
    infos = [NodeInfo(101, "a", 0, "127.0.0.1:7100", 8, 0), NodeInfo(102, "a", 1, "x:1", 0, 0)]
    s.roster = build_roster(infos, 2)
    s.roster["a"].token = "t"
    s.num_rounds = 1
    msgs = list(s.configure_train(1, s.initial_arrays(), ConfigRecord(), grid=None))  # type: ignore[arg-type]
    msg = next(m for m in msgs if m.content.config_records["config"]["shard"] == 0)
    states = [s.pm.shard(k).state_dict() for k in range(2)]
    whole = sum(t.numel() * t.element_size() for st in states for t in st.values())
    del s, msgs, states
    gc.collect()
    node_config: dict[str, bool | float | int | str] = {
        "household": "a",
        "shard": 0,
        "peer-address": "127.0.0.1:7100",
    }
    ctx = Context(run_id=1, node_id=101, node_config=node_config, state=RecordDict(), run_config={})
    base = _baseline_mb()  # resets the high-water mark
    _, shard, _, _, _ = ca._setup(msg, ctx)
    gc.collect()
    st = _status_mb()
    held = sum(t.numel() * t.element_size() for t in shard.state_dict().values())
    print(
        json.dumps(
            {
                "code": ca.__file__,
                "setup_peak_mb": round(_peak_mb() - base, 1),
                "after_setup_mb": round(st["VmRSS"] - base, 1),
                "shard_tensor_mb": round(held / 2**20, 1),
                "all_shards_tensor_mb": round(whole / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
