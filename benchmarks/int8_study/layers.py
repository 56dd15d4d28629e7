import sys, numpy as np, onnx, onnxruntime as ort
from onnx import helper
WORK = sys.argv[1]; D = np.load(f"{WORK}/data.npz"); x = D["holdout"][:4]
base = onnx.load(f"{WORK}/model_pre.onnx")
names = [n.output[0] for n in base.graph.node if n.name.startswith("/backbone") and n.op_type in ("Conv","Clip")][:int(sys.argv[3])]
ops = {n.output[0]: n.op_type for n in base.graph.node}
def run(path):
    m = onnx.load(path)
    have = {o for n in m.graph.node for o in n.output}
    nm = [n for n in names if n in have]
    for n in nm: m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    o = ort.SessionOptions(); o.intra_op_num_threads=1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if len(sys.argv)>4 else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
    return dict(zip(nm, s.run(nm, {"images": x})))
a = run(f"{WORK}/model_pre.onnx"); b = run(sys.argv[2])
for n in names:
    if n in a and n in b:
        u, v = a[n], b[n]
        print(ops[n], n[:60], u.shape, "rel rms err %.4f" % float(np.sqrt(((u-v)**2).mean())/np.sqrt((u**2).mean())))
