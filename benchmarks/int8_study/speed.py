"""CPU time per batch at 1 thread, interleaved rounds: ORT and OpenVINO models side by side."""
import sys, time, json, numpy as np
from pathlib import Path
import onnxruntime as ort
WORK = Path(sys.argv[1]); SPECS = sys.argv[2].split(","); ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 15
D = np.load(WORK / "data.npz"); x8 = np.ascontiguousarray(D["holdout"][:8]); x1 = x8[:1].copy()
def load(spec):
    kind, _, path = spec.partition("=")
    if kind == "ort":
        o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
        s = ort.InferenceSession(str(WORK / path), o, providers=["CPUExecutionProvider"])
        return lambda x: s.run(["scores"], {"images": x})
    import openvino as ov
    prec = "bf16" if kind == "ovbf16" else "f32"
    c = ov.Core().compile_model(str(WORK / path), "CPU", {"INFERENCE_NUM_THREADS": 1,
        "INFERENCE_PRECISION_HINT": prec, "PERFORMANCE_HINT": "LATENCY"})
    r = c.create_infer_request()
    return lambda x: r.infer([x])
runs = {s: load(s) for s in SPECS}
for f in runs.values(): f(x1); f(x8)
t1 = {s: [] for s in SPECS}; t8 = {s: [] for s in SPECS}
for _ in range(ROUNDS):
    for s, f in runs.items():
        a = time.process_time(); f(x1); t1[s].append(time.process_time() - a)
        a = time.process_time(); f(x8); t8[s].append(time.process_time() - a)
for s in SPECS:
    b1 = 1000 * float(np.median(t1[s])); b8 = 8 / float(np.median(t8[s]))
    row = {"spec": s, "batch1_ms_cpu_median": round(b1, 1), "batch1_ms_cpu_min": round(1000 * min(t1[s]), 1),
           "batch8_img_per_cpu_s": round(b8, 1)}
    print(json.dumps(row), flush=True)
