"""ONNX Runtime GenAI model folders: ``modeldir`` is the one home for "is this a genai folder" (its checks, size,
weights hash, chat template), shared by every stage."""
