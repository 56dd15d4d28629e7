"""INT8 study: quantise an msflow ONNX export several ways, measure agreement with fp32 and speed."""
import json, sys, time, os
from pathlib import Path
import numpy as np, onnx, onnxruntime as ort
from sklearn.metrics import roc_auc_score
from onnxruntime.quantization import (quantize_static, quantize_dynamic, CalibrationDataReader,
    CalibrationMethod, QuantFormat, QuantType, quant_pre_process)

WORK = Path(sys.argv[1]); OPTS = sys.argv[2].split(",")
D = np.load(WORK / "data.npz")
FP32 = WORK / "model.onnx"
PRE = WORK / "model_pre.onnx"
meta = {p.key: p.value for p in onnx.load(FP32, load_external_data=False).metadata_props}
THR = float(meta["threshold_image"]); SCALES = 3.0

def session(path):
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])

def run(sess, x, bs=8):
    outs = [sess.run(["scores", "pixel_map"], {"images": x[i:i + bs]}) for i in range(0, len(x), bs)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

class Reader(CalibrationDataReader):
    def __init__(self, x, bs=1): self.it = iter([{"images": x[i:i + bs]} for i in range(0, len(x), bs)])
    def get_next(self): return next(self.it, None)

def conv_nodes(model):
    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            out[n.name] = g
    return out

def select(model, which):
    convs = conv_nodes(model)
    bb = [n for n in convs if n.startswith("/backbone")]
    flows = [n for n in convs if not n.startswith("/backbone")]
    if which == "backbone": return bb
    if which == "flows": return flows
    if which == "all": return bb + flows
    if which == "depthwise": return [n for n in bb if convs[n] > 1]
    if which == "pointwise": return [n for n in bb if convs[n] == 1 and "stem" not in n]
    if which == "safe":  # no stem, no depthwise, not the last block of each stage
        last = {"stages.0.2", "stages.1.1", "stages.2.5"}  # the blocks whose outputs are pooled into the three feature maps
        return [n for n in bb if convs[n] == 1 and "stem" not in n and not any(l + "/" in n for l in last)]
    raise ValueError(which)

def make(opt):
    """opt: 'static:<nodes>:<calib>:<n_calib>:<act>[:src]' or 'dynamic:<nodes>'."""
    out = WORK / f"q_{opt.replace(':', '_')}.onnx"
    if out.exists(): return out
    parts = opt.split(":")
    model = onnx.load(PRE)
    nodes = select(model, parts[1])
    if parts[0] == "wonly":  # weights rounded to per-channel symmetric int8 and back; activations float
        from onnx import numpy_helper
        inits = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.name in nodes:
                w = numpy_helper.to_array(inits[n.input[1]])
                scale = np.abs(w).reshape(len(w), -1).max(1).reshape(-1, *[1] * (w.ndim - 1)) / 127
                q = np.round(w / np.where(scale > 0, scale, 1)) * scale
                inits[n.input[1]].CopyFrom(numpy_helper.from_array(q.astype(np.float32), n.input[1]))
        onnx.save(model, out)
        return out
    if parts[0] == "dynamic":
        quantize_dynamic(PRE, out, op_types_to_quantize=["Conv"], nodes_to_quantize=nodes,
                         per_channel=True, weight_type=QuantType.QInt8)
        return out
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[parts[2]]
    n = int(parts[3]); src = parts[5] if len(parts) > 5 else "holdout"
    x = D[src][:n] if src != "both" else np.concatenate([D["holdout"], D["fit"]])[:n]
    act = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8, "s16": QuantType.QInt16}[parts[4]]
    extra = {"ActivationSymmetric": act in (QuantType.QInt8, QuantType.QInt16)}
    if parts[2] == "percentile": extra["CalibPercentile"] = 99.99
    quantize_static(PRE, out, Reader(x), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                    nodes_to_quantize=nodes, per_channel=True, activation_type=act,
                    weight_type=QuantType.QInt8, calibrate_method=calib, extra_options=extra)
    return out

def cpu_times(sessions, x, rounds=9):
    best = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.process_time(); s.run(["scores"], {"images": x}); best[k].append(time.process_time() - t)
    return {k: float(np.median(v)) for k, v in best.items()}

def pix_auroc(maps, masks, labels):
    # all test images, every second pixel in each direction (bounds the cost)
    return 100 * roc_auc_score(masks[:, ::2, ::2].ravel(), maps[:, ::2, ::2].ravel())

def reference():
    cache = WORK / "ref.npz"
    if not cache.exists():
        s = session(FP32)
        hs, hm = run(s, D["holdout"]); ts, tm = run(s, D["test"])
        np.savez(cache, hs=hs, hm=hm, ts=ts, tm=tm)
    return dict(np.load(cache))

def main():
    if not PRE.exists(): quant_pre_process(str(FP32), str(PRE), skip_symbolic_shape=True)
    ref = reference(); labels = D["labels"]
    ref_auc = 100 * roc_auc_score(labels, ref["ts"]); ref_pix = pix_auroc(ref["tm"], D["masks"], labels)
    print(f"fp32: image AUROC {ref_auc:.2f} pixel {ref_pix:.2f} thr {THR}", flush=True)
    for opt in OPTS:
        t0 = time.process_time(); path = make(opt); qsec = time.process_time() - t0
        s = session(path)
        hs, hm = run(s, D["holdout"]); ts, tm = run(s, D["test"])
        auc = 100 * roc_auc_score(labels, ts)
        row = {"option": opt, "image_auroc": round(auc, 2), "d_image_auroc": round(auc - ref_auc, 2),
               "flips_holdout": float(np.mean((hs >= THR) != (ref["hs"] >= THR))),
               "flips_test": float(np.mean((ts >= THR) != (ref["ts"] >= THR))),
               "score_maxdiff_rel": float(np.abs(ts - ref["ts"]).max() / max(1, np.abs(ref["ts"]).max())),
               "d_pixel_auroc": round(pix_auroc(tm, D["masks"], labels) - ref_pix, 2),
               "map_maxdiff_rel": float(np.abs(tm - ref["tm"]).max() / SCALES),
               "quantise_cpu_s": round(qsec, 1)}
        print(json.dumps(row), flush=True)
        with open(WORK / "rows.jsonl", "a") as f: f.write(json.dumps(row) + "\n")

if __name__ == "__main__":
    main()
