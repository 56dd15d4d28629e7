import sys, numpy as np, onnx
from onnxruntime.quantization import quantize_static, CalibrationDataReader, QuantFormat, QuantType, CalibrationMethod
WORK = sys.argv[1]; D = np.load(f"{WORK}/data.npz"); x = D["holdout"][:8]
class R(CalibrationDataReader):
    def __init__(s): s.it = iter([{"images": x[i:i+1]} for i in range(len(x))])
    def get_next(s): return next(s.it, None)
node = sys.argv[2]; out = sys.argv[3]
extra = dict(a.split("=") for a in sys.argv[4:])
extra = {k: (v == "1") if v in ("0","1") else v for k, v in extra.items()}
quantize_static(f"{WORK}/model_pre.onnx", out, R(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
    nodes_to_quantize=node.split(","), per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    calibrate_method=CalibrationMethod.MinMax, extra_options=extra)
