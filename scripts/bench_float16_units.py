"""Would float16 unit embeddings do for cosine? Speed of an exact scan and the MAP they give.

    python -m scripts.bench_float16_units --bundle models/wikipedia --items 200000

Prints (1) the cosine MAP@50 of the Wikipedia test split with the gallery side's unit
embeddings in float32 and rounded to float16, and (2) the median time of an exact cosine
scan of `--items` synthetic units: float32 einsum (today's kernel), float16 converted by
numpy, and float16 converted by an onnxruntime Cast in chunks (exact: every float16 is a
float32), each followed by the same einsum kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from app.bundle import load_bundle
from app.retrieval import cosine_scores, unit_rows
from training.data import load_dataset, resolve
from training.evaluate import metrics_from_scores

CHUNK = 4096


def cast_session() -> ort.InferenceSession:
    """float16 (n, C) -> float32 (n, C): onnxruntime converts with SIMD, numpy does not."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["half"], ["full"], to=TensorProto.FLOAT)],
        "cast",
        [helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["n", "c"])],
        [helper.make_tensor_value_info("full", TensorProto.FLOAT, ["n", "c"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def median_ms(run: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default="models/wikipedia")
    parser.add_argument("--items", type=int, default=200_000)
    args = parser.parse_args()

    bundle = load_bundle(args.bundle)
    split = load_dataset(resolve("wikipedia")[1]).test
    image, text = bundle.embed("image", split.image), bundle.embed("text", split.text)
    for name, cast in (("float32", np.float32), ("float16", np.float16)):
        scores = (cosine_scores(image, text.astype(cast)), cosine_scores(text, image.astype(cast)))
        m = metrics_from_scores(scores, split.labels)
        print(
            f"gallery units {name}: MAP@50 i2t {m['i2t_map50']:.6f} t2i {m['t2i_map50']:.6f}"
            f" mean {m['mean_map50']:.6f}"
        )

    rng = np.random.default_rng(0)
    units = unit_rows(rng.standard_normal((args.items, bundle.pool.dim)).astype(np.float32))
    half = units.astype(np.float16)
    query = units[:1]
    session = cast_session()

    def ort_chunks() -> None:
        for start in range(0, len(half), CHUNK):
            full = session.run(None, {"half": half[start : start + CHUNK]})[0]
            cosine_scores(query, full)

    exact_cast = session.run(None, {"half": half[:CHUNK]})[0]
    assert np.array_equal(exact_cast, half[:CHUNK].astype(np.float32)), "Cast is not exact"
    print(f"exact cosine scan of {args.items} items, median ms:")
    print(f"  float32 einsum            {median_ms(lambda: cosine_scores(query, units)):8.1f}")
    print(f"  float16 numpy conversion  {median_ms(lambda: cosine_scores(query, half)):8.1f}")
    print(f"  float16 onnxruntime Cast  {median_ms(ort_chunks):8.1f}")


if __name__ == "__main__":
    main()
