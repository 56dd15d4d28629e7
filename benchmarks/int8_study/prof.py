import sys, json, collections, numpy as np, onnxruntime as ort
from pathlib import Path
path = sys.argv[1]; bs = int(sys.argv[2])
D = np.load(Path(path).parent / "data.npz"); x = np.ascontiguousarray(D["holdout"][:bs])
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.enable_profiling = True; o.profile_file_prefix = "/tmp/int8prof"
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
for _ in range(6): s.run(["scores"], {"images": x})
f = s.end_profiling(); ev = json.load(open(f))
by_part = collections.Counter(); by_op = collections.Counter()
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        n = e["name"][:-12]; op = e["args"].get("op_name")
        part = n.split("/")[1] if n.startswith("/") else "other:" + n[:20]
        by_part[part.split(".")[0]] += e["dur"] / 6000; by_op[op] += e["dur"] / 6000
print("ms per run by part", {k: round(v, 2) for k, v in by_part.most_common(8)})
print("ms by op", {k: round(v, 2) for k, v in by_op.most_common(12)})
