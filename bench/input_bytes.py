"""Input-hop bytes per image: the model input sent as fp32, int8 or uint8 pixels (issue 17).

The plan's own prediction (:func:`disco_fl.emulation.comm.program_traffic`, the count the
wire is tested against): the requester sends the input to each of the N - 1 other nodes, as
fp32 (4 bytes per element), with an int8 plan's codec (1 lossy byte per element and one fp32
scale per sample) or as uint8 image pixels (1 exact byte per element, whatever the codec).
The rest of a request's traffic does not depend on the input's dtype (printed as a check).

Usage::

    python bench/input_bytes.py                      # resnet50 at 224 px, N = 2
    python bench/input_bytes.py --image-size 64 --nodes 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import disco_fl
from disco_fl.emulation.comm import program_traffic
from disco_fl.partition import plan_open_count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=224, help="resnet50's input side, px")
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import latency_models

    model, x = latency_models.load_resnet50(args.image_size, 2, seed=0)
    pm = disco_fl.partition(model, args.nodes, x).eval()  # every gate open: dense TP
    rows = []
    for name, codec, dtype in [
        ("fp32", "fp32", "float32"),
        ("int8", "int8", "float32"),
        ("uint8", "fp32", "uint8"),
        ("uint8 (int8 plan)", "int8", "uint8"),
    ]:
        rep = program_traffic(pm.program, plan_open_count(pm), codec, dtype)
        rows.append(
            {
                "input": name,
                "plan_codec": codec,
                "input_bytes_per_image": rep.input_bytes,
                "input_bytes_per_peer": rep.input_bytes // (args.nodes - 1),
                "other_bytes_per_image": rep.bytes_per_sample - rep.input_bytes,
            }
        )
    print(f"resnet50 at {args.image_size} px, N = {args.nodes} (input to {args.nodes - 1} peer(s))")
    print("| input | plan codec | input-hop B/image | per peer | vs fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = rows[0]["input_bytes_per_image"] / r["input_bytes_per_image"]
        print(
            f"| {r['input']} | {r['plan_codec']} | {r['input_bytes_per_image']:,} "
            f"| {r['input_bytes_per_peer']:,} | {ratio:.4f}x fewer |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
