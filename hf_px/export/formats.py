"""The two checkpoint formats and the names of the files they write into a checkpoint folder."""

FORMATS = ("dense", "sparse")
SPARSE_FILE = "model.sparse.safetensors"
DENSE_FILE = "model.safetensors"
META_FILE = "hf_px.json"
# transformers' own weight files, replaced by SPARSE_FILE in the sparse format
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
