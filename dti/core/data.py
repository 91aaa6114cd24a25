"""Data: training images, the prompt templates around the token, and a resumable stream of batches."""

import hashlib
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from dti.core.constants import CONVERTIBLE_MODES, IMAGE_EXTENSIONS, logger


def stable_seed(*key):
    """A 63-bit seed derived from a tuple of ints and strings, identical in every process and run."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def to_rgb(image, resolution=None):
    """An RGB copy of a PIL image: first frame, EXIF rotation applied, 16-bit scaled to 8 bits, transparency
    composited on white. Images far above `resolution` are reduced while decoding, so huge photos cost little memory;
    the size before that is kept in .info["original_size"] = (height, width) for a family's size conditioning."""
    image.seek(0)  # first frame of animated images
    width, height = image.size
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # an EXIF rotation by 90 degrees swaps the sides
        width, height = height, width
    if resolution and image.format == "JPEG":
        image.draft("RGB", (2 * resolution, 2 * resolution))  # decode at 1/2, 1/4 or 1/8 scale
    image = ImageOps.exif_transpose(image)
    if resolution and min(image.size) >= 4 * resolution:
        image = image.reduce(min(image.size) // (2 * resolution))
    if image.mode.startswith(("I", "F")):  # 16- and 32-bit integer or float grayscale
        image = Image.fromarray(gray_to_8bit(np.asarray(image)))
    if image.mode not in CONVERTIBLE_MODES:  # PIL would convert LAB, HSV, ... channel by channel: wrong colours
        raise ValueError(f"image mode {image.mode} cannot be converted to RGB faithfully; save it as RGB")
    if image.mode in ("RGBA", "LA", "P", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    rgb = image.convert("RGB")
    rgb.info["original_size"] = (height, width)
    return rgb


def gray_to_8bit(values):
    """A 16- or 32-bit integer or float grayscale array as uint8: integers by the bit depth their values need (8,
    16 or 32 bits), floats up to 1 as fractions of white, larger floats as 0-255 values (clipped)."""
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64), nan=0.0)
    peak = values.max(initial=0)
    if is_float and peak <= 1:
        values = values * 255
    elif not is_float and peak > 255:
        values = values / 2 ** (8 if peak < 2**16 else 24)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def open_image(source, resolution):
    """to_rgb of an image file or file object; a decompression bomb (more than twice PIL's pixel limit) raises
    ValueError like any unreadable file."""
    try:
        with Image.open(source) as image:
            return to_rgb(image, resolution)
    except Image.DecompressionBombError as error:
        raise ValueError(f"too many pixels for an image: {error}") from None


def warn_small_images(images, resolution):
    for name, image in images:
        if min(image.size) < resolution:
            logger.warning(
                f"{Path(str(name)).name} is {image.width}x{image.height}, smaller than --resolution; upscaled."
            )
    return images


def load_training_images(train_data_dir, resolution):
    """Read every image of the folder: EXIF rotation applied, converted to RGB. Returns [(path, PIL.Image)]."""
    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise ValueError(f"--train_data_dir {folder} is not a folder; point it at a folder of images.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images = []
    for path in paths:
        try:
            images.append((path, open_image(path, resolution)))
        except (OSError, ValueError) as error:
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
    if not images:
        raise ValueError(f"--train_data_dir {folder} holds no readable image ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return warn_small_images(images, resolution)


def check_caption(caption, where):
    """A caption is a string with a '{}' slot for the token."""
    if not isinstance(caption, str):
        raise ValueError(f"{where} is a {type(caption).__name__}, not a string with '{{}}' where the token goes.")
    if "{}" not in caption:
        raise ValueError(f"{where} has no '{{}}' where the token goes: write e.g. 'a {{}} on a mossy rock'.")


def read_captions(path):
    """--captions: {image file name or '<folder>/<file name>': caption}, every caption checked; keys starting with
    '_' (a note such as '_source') are left out."""
    try:
        table = json.loads(Path(path).read_text())
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"--captions {path} cannot be read ({reason}); give a JSON file of captions.") from None
    except ValueError as error:
        raise ValueError(f"--captions {path} is not JSON ({error}); give {{image file name: caption}}.") from None
    if not isinstance(table, dict):
        raise ValueError(f"--captions {path} must hold a JSON object {{image file name: caption}}.")
    captions = {key: caption for key, caption in table.items() if not key.startswith("_")}
    for key, caption in captions.items():
        check_caption(caption, f"--captions {path}: the caption of {key!r}")
    return captions


def match_captions(path, captions, images):
    """The caption of each image [(path, image)] of --train_data_dir: the entry of '<folder>/<file name>', else of
    '<file name>'. An image without one is refused (no silent mix of captions and templates)."""
    keys = [(f"{p.parent.name}/{p.name}", p.name) for p, _ in images]
    missing = [name for own, name in keys if own not in captions and name not in captions]
    if missing:
        more = f" and {len(missing) - 1} other image(s)" if len(missing) > 1 else ""
        raise ValueError(f"--captions {path} has no caption for {missing[0]!r}{more} of --train_data_dir; give every "
                         "image one, keyed by its file name.")  # fmt: skip
    return [captions[own] if own in captions else captions[name] for own, name in keys]


def load_concept_data(args):
    """A concept's training images [(name, PIL image)] and their captions (None: the templates), from
    --train_data_dir and --captions or from --dataset_name and --caption_column. The captions file is read first:
    its errors are found before the images are decoded."""
    if args.dataset_name:
        return load_dataset_images(args)
    captions = read_captions(args.captions) if args.captions else None
    images = load_training_images(args.train_data_dir, args.resolution)
    return images, match_captions(args.captions, captions, images) if captions is not None else None


def load_dataset_images(args):
    """The images of --dataset_name's train split (a Hub id, an image folder, or parquet / arrow files) and, with
    --caption_column, the caption of each image kept (None without)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError("--dataset_name needs datasets: pip install datasets.") from error
    name, path = args.dataset_name, Path(args.dataset_name)
    builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix) if path.is_file() else None
    try:
        if builder:
            dataset = datasets.load_dataset(builder, data_files=str(path), cache_dir=args.cache_dir, split="train")
        else:
            dataset = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    except (OSError, ValueError, ConnectionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--dataset_name {name!r} could not be loaded ({reason}).") from error
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column is not None and column not in dataset.column_names:
            columns = ", ".join(dataset.column_names)
            raise ValueError(f"{flag} {column!r} is not a column of {name}; its columns: {columns}.")
    texts = dataset[args.caption_column] if args.caption_column else None
    if isinstance(dataset.features[args.image_column], datasets.Image):  # decoded below, as image files are
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    images, captions = [], []
    for i, item in enumerate(dataset[args.image_column]):
        row = f"{path.name or name}[{i}]"
        if texts is not None:
            check_caption(texts[i], f"--caption_column {args.caption_column!r}: row {i}")
        try:
            if isinstance(item, dict) and (item.get("bytes") or item.get("path")):
                source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            elif isinstance(item, (str, bytes)) and item:
                source = io.BytesIO(item) if isinstance(item, bytes) else item
            else:
                raise ValueError(f"a {type(item).__name__}, not an image")
            images.append((row, open_image(source, args.resolution)))
            captions.append(texts[i] if texts is not None else None)
        except (OSError, ValueError) as error:
            logger.warning(f"Skipping row {i} of --image_column {args.image_column!r}: not a readable image ({error}).")
    if not images:
        raise ValueError(
            f"--dataset_name {name!r}: no row of --image_column {args.image_column!r} holds a readable image."
        )
    return warn_small_images(images, args.resolution), captions if texts is not None else None


class DTIDataset(Dataset):
    """An endless, deterministic stream of training samples.

    Item `position` is the position-th sample of the stream: epoch `position // len(self)` visits the images
    `repeats` times in an order drawn from (seed, epoch); every random choice of the sample (template, crop, flip)
    is drawn from (seed, position). So a resumed run, or a run split over several processes, sees exactly the
    samples an uninterrupted single-process run sees. With captions (one per image, '{}' for the token) a sample's
    prompt is its image's caption; the template is drawn all the same, so crops and flips do not depend on them.
    """

    def __init__(
        self, images, prompt_token, tokenize, resolution, center_crop, random_flip, templates, repeats, seed,
        captions=None, resampling="bilinear",
    ):  # fmt: skip
        self.images = [self._resize(image, resolution, resampling) for _, image in images]
        self.original_sizes = [image.info.get("original_size", image.size[::-1]) for _, image in images]
        self.prompt_token = prompt_token
        self.tokenize = tokenize  # prompt -> {name: list of ids}, as the pipeline tokenizes
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.templates = templates
        self.captions = captions
        self.repeats = repeats
        self.seed = seed
        self.with_pixels = True  # False once the latents are cached: no image work per sample then
        self._order = (None, None)

    @staticmethod
    def _resize(image, resolution, resampling="bilinear"):
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        return image.resize(size, Image.Resampling[resampling.upper()], reducing_gap=3.0)

    def __len__(self):
        return len(self.images) * self.repeats

    @property
    def crops_are_fixed(self):
        """True when every crop is the same each time an image is drawn, so its latents can be cached."""
        return self.center_crop or all(image.size == (self.resolution,) * 2 for image in self.images)

    def _image_index(self, position):
        epoch, offset = divmod(position, len(self))
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "order", epoch))
            self._order = (epoch, torch.randperm(len(self), generator=generator).tolist())
        return self._order[1][offset] % len(self.images)

    def _crop(self, image, rng):
        height, width, size = image.height, image.width, self.resolution
        if self.center_crop:
            return (height - size) // 2, (width - size) // 2
        return rng.randint(0, height - size), rng.randint(0, width - size)

    def pixels(self, index, top, left, flip):
        """The crop of image `index` as a [3, H, W] float tensor in [-1, 1]."""
        image = self.images[index].crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __getitem__(self, position):
        rng = random.Random(stable_seed(self.seed, "sample", position))
        index = self._image_index(position)
        template = rng.choice(self.templates)  # drawn with captions too: the draws after it stay the same
        if self.captions is None:
            prompt = template.format(self.prompt_token)
        else:
            prompt = self.captions[index].replace("{}", self.prompt_token)
        top, left = self._crop(self.images[index], rng)
        flip = self.random_flip and rng.random() < 0.5
        crop_left = self.images[index].width - left - self.resolution if flip else left
        return {
            "position": position,
            "image_index": index,
            "flip": flip,
            "pixel_values": self.pixels(index, top, left, flip) if self.with_pixels else None,
            "original_size": torch.tensor(self.original_sizes[index]),
            "crop_top_left": torch.tensor((top, crop_left)),
            "text": self.tokenize(prompt),
            "prompt": prompt,
        }


def collate(samples):
    return {
        "position": torch.tensor([s["position"] for s in samples]),
        "image_index": torch.tensor([s["image_index"] for s in samples]),
        "flip": torch.tensor([s["flip"] for s in samples], dtype=torch.long),
        "pixel_values": None
        if samples[0]["pixel_values"] is None
        else torch.stack([s["pixel_values"] for s in samples]),
        "original_size": torch.stack([s["original_size"] for s in samples]),
        "crop_top_left": torch.stack([s["crop_top_left"] for s in samples]),
        "text": {key: torch.tensor([s["text"][key] for s in samples]) for key in samples[0]["text"]},
        "prompt": [s["prompt"] for s in samples],
    }


class StreamSampler(Sampler):
    """Positions of the sample stream for one process, from `start` on, forever.

    Global batch b holds positions [b * G, (b + 1) * G) with G = batch_size * num_processes; process r takes the
    r-th slice of batch_size positions. One process with batch 2 and two processes with batch 1 see the same
    samples in the same global batches.
    """

    def __init__(self, start, batch_size, process_index, num_processes):
        self.start, self.batch_size = start, batch_size
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self):
        global_batch = self.batch_size * self.num_processes
        batch = self.start // global_batch
        while True:
            first = batch * global_batch + self.process_index * self.batch_size
            yield from range(first, first + self.batch_size)
            batch += 1

    def __len__(self):  # endless; DataLoader only needs it for len(), which we never call
        return sys.maxsize


def caption_source(args):
    """Where a concept's per-image captions come from, for the metadata and the card: the file's name or the column."""
    return Path(args.captions).name if args.captions else f"column {args.caption_column}"


def validation_prompt(args):
    return args.validation_prompt.replace("{}", args.placeholder_token)


def keyed_generators(seed, positions, device):
    """One torch.Generator per sample, seeded from (seed, stream position): the noise of a sample never depends
    on which process draws it or whether the run was resumed."""
    return [torch.Generator(device).manual_seed(stable_seed(seed, "noise", int(p))) for p in positions]
