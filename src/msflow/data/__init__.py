"""Images and datasets: decoding every input to RGB, MVTec/VisA folders and the built-in ELPV sets."""
