"""OpenVINO + NNCF INT8 of an msflow ONNX export: agreement with fp32 ORT and speed."""
import json, sys, time
from pathlib import Path
import numpy as np, onnx, openvino as ov, nncf
from sklearn.metrics import roc_auc_score
WORK = Path(sys.argv[1]); OPTS = sys.argv[2].split(",")
D = np.load(WORK / "data.npz"); REF = dict(np.load(WORK / "ref.npz"))
meta = {p.key: p.value for p in onnx.load(WORK / "model.onnx").metadata_props}
THR = float(meta["threshold_image"])
core = ov.Core()

def compiled(model, precision="f32"):
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": precision,
                                             "PERFORMANCE_HINT": "LATENCY"})

def run(c, x, bs=8):
    sc, pm = [], []
    for i in range(0, len(x), bs):
        r = c(x[i:i + bs]); sc.append(r["scores"]); pm.append(r["pixel_map"])
    return np.concatenate(sc), np.concatenate(pm)

def pix(maps): return 100 * roc_auc_score(D["masks"][:, ::2, ::2].ravel(), maps[:, ::2, ::2].ravel())

def make(opt, base):
    """opt: ov-fp32 | ov-bf16 | nncf:<scope>:<preset>:<n>[:fbc|bc|cle]"""
    p = opt.split(":")
    if p[0] == "ov": return base, p[1]
    scope = None
    names = [op.get_friendly_name() for op in base.get_ops() if op.get_type_name() == "Convolution"]
    ops = [op.get_friendly_name() for op in base.get_ops()]
    if p[1] == "backbone":  # every op outside the backbone is left in float (names: patterns missed TopK)
        scope = nncf.IgnoredScope(names=[o for o in ops if not o.startswith("/backbone")], validate=False)
    elif p[1] == "flows":
        keep = ("/parallel_flows", "/fusion_flow")
        scope = nncf.IgnoredScope(names=[o for o in ops if not o.startswith(keep)], validate=False)
    n = int(p[3]); src = p[5] if len(p) > 5 else "holdout"
    x = D[src][:n] if src != "both" else np.concatenate([D["holdout"], D["fit"]])[:n]
    ds = nncf.Dataset([x[i:i + 1] for i in range(len(x))])
    preset = {"perf": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[p[2]]
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    adv = AdvancedQuantizationParameters()
    extra = p[4] if len(p) > 4 else "fbc"
    kw = dict(fast_bias_correction=(extra != "bc"))
    if extra == "cle": adv = AdvancedQuantizationParameters(); kw["model_type"] = None
    q = nncf.quantize(base, ds, preset=preset, subset_size=n, ignored_scope=scope, advanced_parameters=adv, **kw)
    return q, "f32"

def main():
    base = core.read_model(str(WORK / "model.onnx"))
    labels = D["labels"]; ref_auc = 100 * roc_auc_score(labels, REF["ts"]); ref_pix = pix(REF["tm"])
    for opt in OPTS:
        t0 = time.process_time(); model, prec = make(opt, base); qs = time.process_time() - t0
        c = compiled(model, prec)
        hs, hm = run(c, D["holdout"]); ts, tm = run(c, D["test"])
        auc = 100 * roc_auc_score(labels, ts)
        row = {"option": opt, "image_auroc": round(auc, 2), "d_image_auroc": round(auc - ref_auc, 2),
               "flips_holdout": float(np.mean((hs >= THR) != (REF["hs"] >= THR))),
               "flips_test": float(np.mean((ts >= THR) != (REF["ts"] >= THR))),
               "score_maxdiff_rel": float(np.abs(ts - REF["ts"]).max() / max(1, np.abs(REF["ts"]).max())),
               "d_pixel_auroc": round(pix(tm) - ref_pix, 2),
               "map_maxdiff_rel": float(np.abs(tm - REF["tm"]).max() / 3), "quantise_cpu_s": round(qs, 1)}
        print(json.dumps(row), flush=True)
        with open(WORK / "rows.jsonl", "a") as f: f.write(json.dumps(row) + "\n")
        if opt.startswith("nncf"): ov.save_model(model, str(WORK / f"{opt.replace(':', '_')}.xml"))

main()
