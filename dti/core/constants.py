"""Templates and constants shared by every family."""

from accelerate.logging import MultiProcessAdapter, get_logger
from accelerate.state import PartialState

__version__ = "0.1.0"


class RunLogger(MultiProcessAdapter):
    """accelerate's logger (main_process_only=, in_order=), whose [RANK i] prefix tells processes apart: a run of one
    process gets none."""

    def process(self, msg, kwargs):
        if PartialState().num_processes > 1:
            return super().process(msg, kwargs)
        kwargs.setdefault("stacklevel", 2)  # as accelerate's: the record names the caller, not this adapter
        return msg, kwargs


logger = RunLogger(get_logger(__name__).logger, {})

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

MIN_TRAINING_IMAGES = 3  # fewer train without error, with a warning: 3-6 views of a concept learn it reliably
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CONVERTIBLE_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "PA"}
DEFAULT_LEARNING_RATE = {"dti": 1e-2, "ti": 5e-3, "crossinit": 5e-3}
DEFAULT_CROSSINIT_LAMBDA = 1e-5
DEFAULT_LORA_LEARNING_RATE = 1e-4
DEFAULT_LORA_TARGETS = "to_q,to_k,to_v,to_out.0"  # the attention projections, as diffusers' LoRA scripts
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
DEFAULT_VALIDATION_PROMPT = "a {} with Japanese modern city street in the background"
CHECKPOINT_STATE = "dti_state.json"
OUTPUT_LOCK = ".dti-train.lock"
# The keys of a --concepts_list entry: the first two are required, then one of the two data sources.
CONCEPT_KEYS = ("placeholder_token", "initializer_token", "train_data_dir", "dataset_name", "num_vectors",
                "learnable_property", "validation_prompt", "output_dir", "captions", "caption_column")  # fmt: skip
MAX_NAME_BYTES = 200  # a placeholder's file names: 255 bytes less '-steps-N_pivotal.safetensors' and a temp suffix
MAX_REPEATS = 100_000  # an epoch of images x repeats samples is shuffled in memory
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: a step size or norm beyond it overflows
MIN_FREE_BYTES = 64 * 2**20  # embeddings and checkpoints take kilobytes; validation images and logs a few MB
