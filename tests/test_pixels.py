"""uint8 image pixels as the model input (issue 17): one conversion everywhere, exact on the
wire at 1 byte per pixel whatever the plan's codec, refused wherever they do not belong.

The runtime (N node threads over in-process transports: frames cross as bytes and are
validated as over the network) with a uint8 request == the shards run on the normalized float
input, bit for bit; payload bytes per (src, dst, layer) == the plan's prediction for a uint8
input, whose input frames are 4x fewer bytes than fp32. Malformed: uint8 frames outside the
input, codec / dtype mismatches, pixels for a plan without an input normalization, pixels of
the wrong shape. The same over real ``disco-fl serve`` processes: tests/test_serve.py.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import disco_fl
from disco_fl.core.pixels import (
    PixelError,
    image_normalization,
    model_input,
    pixel_problem,
    pixels_to_input,
)
from disco_fl.core.wire import (
    WireError,
    decode_tensor,
    encode_tensor,
    frame_kind_problem,
    payload_bytes,
    validate_tensor,
)
from disco_fl.data import ArrayDataset, to_pixels, to_tensor
from disco_fl.emulation.comm import program_traffic
from disco_fl.emulation.export import ExportedShard, load_shard, run_shards
from disco_fl.partition import plan_open_count
from disco_fl.proto_gen.disco.v1 import peer_pb2
from disco_fl.runtime.inference import run_node
from disco_fl.runtime.serving.inputs import load_inputs
from disco_fl.runtime.transport import InProcessHub, TransportError
from disco_fl.runtime.transport.frames import check_incoming
from tests.test_shards import _random_masks
from tests.zoo import ZOO

Frame = peer_pb2.Frame
Tensor = peer_pb2.Tensor
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # per channel: catches a mix-up
META = {"input": {"mean": MEAN, "std": STD}}


def _pixels(n: int = 3, c: int = 3, hw: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, hw, hw), generator=g, dtype=torch.uint8)


# ---- the one conversion ------------------------------------------------------------------


def test_one_conversion_for_loaders_infer_and_nodes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    px = to_pixels(hwc)
    assert px.dtype == torch.uint8 and list(px.shape) == [4, 3, 16, 16]
    x = pixels_to_input(px, MEAN, STD)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(x, (px.float() / 255 - m) / s)  # the stated fp32 arithmetic
    assert torch.equal(to_tensor(hwc, MEAN, STD), x)  # the data loaders
    ds = ArrayDataset(hwc, np.zeros(4, dtype=np.int64), MEAN, STD)
    assert torch.equal(ds[1][0], x[1])
    assert torch.equal(model_input(px, [1, 3, 16, 16], META), x)  # the nodes
    # disco-fl infer: uint8 for a plan with a normalization, else fp32 by the same function
    np.savez(tmp_path / "a.npz", images=hwc)
    sent = load_inputs([tmp_path / "a.npz"], [3, 16, 16], META)
    assert sent.x.dtype == torch.uint8 and torch.equal(sent.x, px)
    plain = load_inputs([tmp_path / "a.npz"], [3, 16, 16], {})
    assert plain.x.dtype == torch.float32 and plain.pixels is not None
    want = pixels_to_input(px, [0.1307] * 3, [0.3081] * 3)  # MNIST's, as before
    assert torch.equal(plain.x, want)


def test_pixel_problems_are_clear() -> None:
    px = _pixels()
    assert pixel_problem(px, [1, 3, 16, 16], META) is None
    why = pixel_problem(px, [1, 3, 16, 16], {})
    assert why is not None and "no image normalization" in why
    why = pixel_problem(px, [1, 3, 16, 16], {"input": {"mean": [0.5]}})
    assert why is not None and "no image normalization" in why
    why = pixel_problem(px, [1, 3, 8, 8], META)
    assert why is not None and "[3, 3, 16, 16]" in why and "[batch, 3, 8, 8]" in why
    why = pixel_problem(px[:, :1], [1, 3, 16, 16], META)
    assert why is not None and "shape" in why
    why = pixel_problem(px, [1, 64], META)
    assert why is not None and "image input" in why
    why = pixel_problem(px.float(), [1, 3, 16, 16], META)
    assert why is not None and "uint8" in why
    with pytest.raises(PixelError, match="no image normalization"):
        model_input(px, [1, 3, 16, 16], {"classes": [1, 2]})
    with pytest.raises(PixelError, match="2 entries but images have 3 channels"):
        image_normalization({"input": {"mean": [0.5, 0.5], "std": [1.0]}}, 3)
    with pytest.raises(PixelError, match="positive"):
        image_normalization({"input": {"mean": 0.5, "std": 0.0}}, 1)


# ---- the wire -----------------------------------------------------------------------------


def test_uint8_tensor_is_exact_one_byte_each_and_only_where_allowed() -> None:
    px = _pixels()
    msg = encode_tensor(px, "uint8")
    assert msg.codec == Tensor.CODEC_UINT8 and msg.dtype == Tensor.DTYPE_UINT8
    assert payload_bytes(msg) == px.numel()  # 1 byte per pixel, no scales
    assert payload_bytes(encode_tensor(px.float(), "fp32")) == 4 * px.numel()
    back = decode_tensor(msg, max_bytes=1 << 20, pixels=True)
    assert back.dtype == torch.uint8 and torch.equal(back, px)
    with pytest.raises(WireError, match="only the model input"):
        decode_tensor(msg, max_bytes=1 << 20)  # pixels where they are not allowed
    with pytest.raises(WireError, match="only the model input"):
        validate_tensor(msg, max_bytes=1 << 20)
    with pytest.raises(WireError, match="uint8 pixels only"):
        encode_tensor(px, "fp32")
    with pytest.raises(WireError, match="uint8 pixels only"):
        encode_tensor(px.float(), "uint8")
    bad = Tensor()
    bad.CopyFrom(msg)
    bad.dtype = Tensor.DTYPE_FLOAT32  # codec uint8, dtype float32
    with pytest.raises(WireError, match="goes with dtype uint8"):
        decode_tensor(bad, max_bytes=1 << 20, pixels=True)
    bad.CopyFrom(encode_tensor(px.float(), "int8"))
    bad.dtype = Tensor.DTYPE_UINT8  # dtype uint8 with another codec
    with pytest.raises(WireError, match="goes with dtype uint8"):
        decode_tensor(bad, max_bytes=1 << 20, pixels=True)
    bad.CopyFrom(msg)
    bad.data = bad.data[:-1]  # one byte short
    with pytest.raises(WireError, match="needs 2304 data bytes"):
        decode_tensor(bad, max_bytes=1 << 20, pixels=True)


@pytest.mark.parametrize(
    "direction", [Frame.FORWARD, Frame.OUTPUT, Frame.NORMS, Frame.BACKWARD, Frame.PROBE]
)
def test_uint8_frame_outside_the_input_is_refused(direction: int) -> None:
    frame = Frame(session_id="s", layer=3, direction=direction, src=0, dst=1)  # type: ignore[arg-type]
    encode_tensor(_pixels(1, 1, 4), "uint8", out=frame.tensor)
    why = check_incoming(frame, 1, 2, 10)
    assert why is not None and "uint8 image pixels where they are not allowed" in why
    frame.direction = Frame.INPUT
    assert check_incoming(frame, 1, 2, 10) is None
    # the receiver's check against the plan: pixels only where it expects the input
    frame.direction = direction  # type: ignore[assignment]
    assert frame_kind_problem(frame, direction, Tensor.CODEC_FP32) is not None
    frame.direction = Frame.INPUT
    assert frame_kind_problem(frame, Frame.INPUT, Tensor.CODEC_INT8) is not None
    assert frame_kind_problem(frame, Frame.INPUT, Tensor.CODEC_INT8, pixels=True) is None


# ---- the runtime: N node threads over in-process transports ------------------------------


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[ExportedShard]]:
    """The ``user`` zoo model (3 channels, 16 px) at N = 3 with random hard masks, exported
    with and without an input normalization, fp32 and int8."""
    build, shape = ZOO["user"]
    torch.manual_seed(3)
    model = build().eval()
    pm = disco_fl.partition(model, 3, torch.randn(*shape)).eval()
    _random_masks(pm, 0.35, seed=3)
    out: dict[str, list[ExportedShard]] = {}
    for name, codec, meta in [
        ("fp32", "fp32", META),
        ("int8", "int8", META),
        ("plain", "fp32", None),
    ]:
        d = tmp_path_factory.mktemp(name)
        pm.export(d, codec=codec, meta=meta)
        out[name] = [load_shard(d / "plan.json", k) for k in range(3)]
    return out


def _run(nodes: Sequence[ExportedShard], x: torch.Tensor, session: str) -> tuple[Any, InProcessHub]:
    """Every node in a thread over one hub; node 0's output (or the first error raised)."""
    hub = InProcessHub(len(nodes), num_layers=len(nodes[0].program.ops))
    results: list[Any] = [None] * len(nodes)

    def go(k: int) -> None:
        try:
            results[k] = run_node(
                nodes[k], hub[k], x if k == 0 else None, session_id=session, timeout=10.0
            )
        except BaseException as e:
            results[k] = e

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results[0], hub


def _predicted(nodes: Sequence[ExportedShard], batch: int, input_dtype: str) -> dict[Any, int]:
    plan = nodes[0].plan
    layer_of = {op.name: i for i, op in enumerate(plan.program.ops)}
    rep = program_traffic(plan.program, plan_open_count(plan), plan.codec, input_dtype)
    out = {}
    for layer in rep.layers:
        for pair, b in layer.pairs.items():
            s, d = (int(v) for v in pair.split("->"))
            if b:
                out[(s, d, layer_of[layer.op])] = b * batch
    return out


def _counted(hub: InProcessHub) -> dict[Any, int]:
    return {(t.index, d, layer): b for t in hub for (d, layer), b in t.payload_bytes_sent().items()}


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_uint8_request_equals_float_input_and_bytes_equal_plan(
    plans: dict[str, list[ExportedShard]], codec: str
) -> None:
    nodes = plans[codec]
    px = _pixels()
    x = pixels_to_input(px, MEAN, STD)  # the normalized float input it stands for
    out, hub = _run(nodes, px, "u8")
    ref = run_shards(nodes, px)  # the shards on the same request: the input hop exact
    # within 1e-5 (threads may change a convolution's rounding: 6e-8 seen once under load)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    out_f, hub_f = _run(nodes, x, "f32")
    torch.testing.assert_close(out_f, run_shards(nodes, x), atol=1e-5, rtol=0)
    if codec == "fp32":  # the float input it stands for, through the same runtime: equal
        assert torch.equal(run_shards(nodes, x), ref)  # one process, one thread: bit for bit
        torch.testing.assert_close(out, out_f, atol=1e-5, rtol=0)
    else:  # an int8 plan rounds a float input on its way to the peers, never the pixels
        assert not torch.equal(out, out_f)
    counted, counted_f = _counted(hub), _counted(hub_f)
    assert counted == _predicted(nodes, 3, "uint8")
    assert counted_f == _predicted(nodes, 3, "float32")
    # the input hop: 1 byte per pixel to each peer, whatever the codec; 4x fewer than fp32
    per = px.numel()
    assert [counted[(0, d, 0)] for d in (1, 2)] == [per, per]
    if codec == "fp32":
        assert [counted_f[(0, d, 0)] for d in (1, 2)] == [4 * per, 4 * per]
    else:  # int8: 1 lossy byte per pixel and a scale per sample
        assert [counted_f[(0, d, 0)] for d in (1, 2)] == [per + 4 * 3] * 2
    # everything past the input hop is the same traffic
    assert {k: v for k, v in counted.items() if k[2]} == {
        k: v for k, v in counted_f.items() if k[2]
    }


def test_uint8_request_for_a_plan_without_normalization_is_refused(
    plans: dict[str, list[ExportedShard]],
) -> None:
    nodes = plans["plain"]
    hub = InProcessHub(3, num_layers=len(nodes[0].program.ops))
    with pytest.raises(PixelError, match="no image normalization"):
        run_node(nodes[0], hub[0], _pixels(), session_id="s", timeout=5.0)
    assert _counted(hub) == {}  # refused before any frame left
    with pytest.raises(PixelError, match="shape"):
        run_node(plans["fp32"][0], hub[0], _pixels(hw=8), session_id="t", timeout=5.0)
    # a peer sent pixels the receiver's plan cannot normalize: the receiver fails clearly
    frame = Frame(session_id="p", layer=0, direction=Frame.INPUT, src=0, dst=1)
    encode_tensor(_pixels(), "uint8", out=frame.tensor)
    hub[0].send(frame)
    with pytest.raises(PixelError, match="no image normalization"):
        run_node(nodes[1], hub[1], None, session_id="p", timeout=5.0)


def test_uint8_frame_at_a_non_input_layer_is_refused_by_the_receiver(
    plans: dict[str, list[ExportedShard]],
) -> None:
    nodes = plans["fp32"]
    hub = InProcessHub(3, num_layers=len(nodes[0].program.ops))
    frame = Frame(session_id="s", layer=2, direction=Frame.FORWARD, src=0, dst=1)
    encode_tensor(_pixels(), "uint8", out=frame.tensor)
    with pytest.raises(TransportError, match="uint8 image pixels where they are not allowed"):
        hub[0].send(frame)


def test_predicted_input_bytes_by_input_dtype(plans: dict[str, list[ExportedShard]]) -> None:
    per = 3 * 16 * 16
    for name, float_b in [("fp32", 4 * per), ("int8", per + 4)]:
        plan = plans[name][0].plan
        reps = {
            d: program_traffic(plan.program, plan_open_count(plan), plan.codec, d)
            for d in ("float32", "uint8")
        }
        assert reps["float32"].input_bytes == 2 * float_b  # to each of the 2 peers
        assert reps["uint8"].input_bytes == 2 * per
        assert (
            reps["float32"].bytes_per_sample - reps["float32"].input_bytes
            == reps["uint8"].bytes_per_sample - reps["uint8"].input_bytes
        )
    with pytest.raises(ValueError, match="input_dtype"):
        program_traffic(plan.program, plan_open_count(plan), plan.codec, "int8")
