"""Using a trained model: the predictor, folder prediction, ONNX export and the HTTP service."""
