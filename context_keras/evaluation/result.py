"""What every protocol returns."""
import dataclasses


@dataclasses.dataclass
class Result:
  """What a protocol measured: metrics (JSON-serialisable; numbers become TensorBoard scalars), images (name ->
  uint8 [H, W, 3], written as TensorBoard images) and files: metric key -> (image name, file name), images also
  written as PNG files in the evaluation folder, the metric then holding the file's path."""
  metrics: dict
  images: dict = dataclasses.field(default_factory=dict)
  files: dict = dataclasses.field(default_factory=dict)
