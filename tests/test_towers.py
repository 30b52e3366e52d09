"""The modern towers and heads of method.md §8: sizes against the published figures, endpoint shapes, where ResNet
units stride, folding with scale and shift on graphs with residual additions, the revisiting head in grid form, L2,
the step schedule."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from context_keras.input import patches as P
from context_keras.model import caffe_layers as CL
from context_keras.model import fold as FO
from context_keras.model import networks as M
from context_keras.training import trainer as T


def count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def test_resnet50_has_the_published_parameter_count():
  """ResNet-50 without its classifier: 23.5 M (torchvision's 25,557,032 minus the 2,049,000 of its fc)."""
  tower = M.resnet_tower(M.ModelConfig(backbone="resnet50", patch_size=64))
  assert count(tower.trainable_weights) == 23_508_032
  resnet18 = M.resnet_tower(M.ModelConfig(backbone="resnet18", patch_size=64))
  assert count(resnet18.trainable_weights) == 11_176_512  # torchvision's 11,689,512 minus its fc


def test_vgg16_conv_part_has_the_published_parameter_count():
  """VGG-16's 13 convolutions: 14.7 M (14,714,688 with biases); here the BN's shift replaces each conv's bias."""
  tower = M.vgg16_bn_tower(M.ModelConfig(backbone="vgg16_bn"))
  convs = [layer for layer in tower.layers if isinstance(layer, keras.layers.Conv2D)]
  assert len(convs) == 13 and not any(layer.use_bias for layer in convs)
  kernels = count(layer.kernel for layer in convs)
  channels = sum(layer.filters for layer in convs)
  assert kernels + channels == 14_714_688
  assert count(w for layer in tower.layers if isinstance(layer, CL.CaffeBatchNorm) and layer.scale
               for w in layer.trainable_weights) == 2 * channels


@pytest.mark.parametrize("backbone, size, expected", [
    ("resnet50", 64, {"after_root": (32, 32, 64), "block1": (32, 32, 256), "block2": (16, 16, 512),
                      "block3": (8, 8, 1024), "block4": (8, 8, 2048), "pre_logits": (2048,)}),
    ("resnet50", 96, {"after_root": (48, 48, 64), "block1": (48, 48, 256), "block2": (24, 24, 512),
                      "block3": (12, 12, 1024), "block4": (12, 12, 2048), "pre_logits": (2048,)}),
    ("vgg16_bn", 96, {"conv1_1": (96, 96, 64), "conv2_2": (48, 48, 128), "conv3_3": (24, 24, 256),
                      "conv4_3": (12, 12, 512), "conv5_3": (6, 6, 512), "pool5": (3, 3, 512), "fc6": (4096,)}),
    ("vgg16_bn", 64, {"conv1_1": (64, 64, 64), "conv5_3": (4, 4, 512), "pool5": (2, 2, 512), "fc6": (4096,)}),
])
def test_named_outputs_have_the_published_sizes(backbone, size, expected):
  """Kolesnikov et al.'s reduced down-sampling: stem stride 1, the 3x3/2 max-pool, stages 1, 2, 2, 1 (8x in all).
  Built at 1/8 of the width (every channel count is divided by 8), which is quicker."""
  config = M.ModelConfig(backbone=backbone, patch_size=size, width_multiplier=0.125)
  tower = M.BACKBONES[backbone].build(config)
  relu_of = {name: f"{name}_relu" for name in expected if name.startswith("conv")}
  relu_of["fc6"] = "relu6"
  sizes = {name: tuple(tower.get_layer(relu_of.get(name, name)).output.shape[1:]) for name in expected}
  assert sizes == {name: shape[:-1] + (shape[-1] // 8,) for name, shape in expected.items()}
  assert set(expected) <= set(M.BACKBONES[backbone].features)


@pytest.mark.slow  # beyond the list of tests; keeps the fast tier's time
def test_imagenet_strides_down_sample_32x():
  config = M.ModelConfig(backbone="resnet50", patch_size=64, resnet_stem_stride=2, resnet_strides=(1, 2, 2, 2),
                         width_multiplier=0.125)
  assert tuple(M.resnet_tower(config).get_layer("block4").output.shape[1:3]) == (2, 2)


@pytest.mark.parametrize("version", [1, 2])
def test_resnet_units_stride_on_the_3x3_convolution(version):
  tower = M.resnet_tower(M.ModelConfig(backbone="resnet50", resnet_version=version, patch_size=64,
                                       width_multiplier=0.125))
  strides = {layer.name: layer.strides[0] for layer in tower.layers if isinstance(layer, keras.layers.Conv2D)}
  assert strides["block2_unit1_conv1"] == 1 and strides["block2_unit1_conv2"] == 2
  assert strides["block2_unit1_conv3"] == 1 and strides["block2_unit1_shortcut"] == 2
  assert strides["block4_unit1_conv2"] == 1 and strides["root_conv"] == 1
  assert sorted(name for name, s in strides.items() if s == 2) == [
      "block2_unit1_conv2", "block2_unit1_shortcut", "block3_unit1_conv2", "block3_unit1_shortcut"]
  kinds = {layer.name: type(layer).__name__ for layer in tower.layers}
  if version == 1:  # post-activation: every conv has its BN, the unit ends in a ReLU after the addition
    assert kinds["block1_unit1_conv1_bn"] == "CaffeBatchNorm" and kinds["block1"] == "ReLU"
  else:  # pre-activation: the unit's input is normalised, the unit ends in the addition
    assert kinds["block1_unit1_preact_bn"] == "CaffeBatchNorm" and kinds["block1"] == "Add"
    assert "root_conv_bn" not in kinds and kinds["postnorm_bn"] == "CaffeBatchNorm"


def randomise_batchnorm(models, rng):
  """Arbitrary moving statistics, scales and shifts, so that folding is checked away from the identity."""
  for model in models:
    for layer in model.layers:
      if isinstance(layer, CL.CaffeBatchNorm):
        channels = layer.mean_sum.shape[0]
        layer.scale_sum.assign(3.0)
        layer.mean_sum.assign(3.0 * rng.normal(0, 2, channels).astype(np.float32))
        layer.variance_sum.assign(3.0 * rng.uniform(0.05, 20, channels).astype(np.float32))
        if layer.scale:
          layer.gamma.assign(rng.normal(1, 0.5, channels).astype(np.float32))
        if layer.center:
          layer.beta.assign(rng.normal(0, 1, channels).astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("backbone, version, head, size", [
    ("vgg16_bn", 1, "doersch", 96), ("resnet50", 1, "revisiting", 64), ("resnet18", 2, "revisiting", 64)])
def test_folding_with_scale_and_shift_equals_the_batchnorm_network(backbone, version, head, size):
  config = M.ModelConfig(backbone=backbone, resnet_version=version, head=head, patch_size=size,
                         width_multiplier=0.0625)
  networks = M.build(config)
  rng = np.random.default_rng(0)
  randomise_batchnorm((networks.tower, networks.head), rng)
  patches = tf.constant(rng.normal(0, 1, (4, size, size, 3)).astype(np.float32))
  valid = tf.ones([4])
  folded = FO.fold_tower(networks.tower, config)
  maps = folded(patches)
  assert not [layer for layer in folded.layers if isinstance(layer, CL.CaffeBatchNorm)]
  assert FO.is_chain(folded) == (backbone == "vgg16_bn")
  names = M.BACKBONES[backbone].features
  sources = [{"fc6": "relu6"}.get(name, f"{name}_relu" if name.startswith("conv") else name) for name in names]
  references = keras.Model(networks.tower.inputs, [networks.tower.get_layer(s).output for s in sources])(
      [patches, valid])
  for name, reference in zip(names, references):
    reference = reference.numpy()
    got = maps[name].numpy().reshape(reference.shape)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max(), err_msg=name)
  features = networks.tower([patches, valid])
  pairs = tf.concat([features[:2], features[2:]], -1)
  np.testing.assert_allclose(FO.fold_batchnorm(networks.head)(pairs).numpy(),
                             networks.head([pairs, tf.ones([2])]).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # beyond the list of tests; keeps the fast tier's time
def test_revisiting_head_in_grid_form_equals_the_context_model():
  config = M.ModelConfig(backbone="resnet18", head="revisiting", patch_size=64, width_multiplier=0.0625)
  networks = M.build(config)
  rng = np.random.default_rng(1)
  randomise_batchnorm((networks.tower, networks.head), rng)
  patches = rng.normal(size=(9, 64, 64, 3)).astype(np.float32)
  first, second, label = (t.numpy() for t in P.revisiting_pairs())
  batch = {"patches": patches, "patch_mask": np.ones(9, bool), "first": first, "second": second,
           "pair_mask": np.ones(8, bool)}
  grid = M.grid_logits(networks, batch, training=False).numpy()
  np.testing.assert_allclose(grid, networks.context_model([patches[first], patches[second]]).numpy(), rtol=1e-4,
                             atol=1e-5)
  # Training: dropout's mask is a pure function of the seed.
  a, b, c = (M.grid_logits(networks, batch, training=True, seed=tf.constant(s, tf.int64)).numpy()
             for s in ([1, 2], [1, 2], [1, 3]))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert label.tolist() == [7, 6, 5, 4, 3, 2, 1, 0]


def test_l2_applies_to_kernels_only_with_the_tf1_half():
  config = M.ModelConfig(backbone="resnet18", head="revisiting", patch_size=64, width_multiplier=0.0625)
  keras.utils.set_random_seed(0)
  trainer = T.Trainer(tf.distribute.get_strategy(), config, T.OptimConfig(l2_tower=1e-4, l2_head=5e-4))
  tower_kernels, head_kernels = trainer.l2_kernels
  assert "embed" in tower_kernels[-1].path and len(tower_kernels) == 1 + sum(
      isinstance(layer, keras.layers.Conv2D) for layer in trainer.networks.tower.layers)
  assert [k.path.split("/")[0] for k in head_kernels] == ["fc7", "fc8"]
  expected = sum(0.5 * scale * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
                 for scale, kernels in ((1e-4, tower_kernels), (5e-4, head_kernels)))
  assert float(trainer._l2_penalty()) == pytest.approx(expected, rel=1e-5)


def test_step_schedule_with_warmup():
  schedule = T.LearningRate(0.05, warmup_steps=10, boundaries=(30, 50), factor=0.1)
  rates = [float(schedule(step)) for step in (0, 4, 9, 29, 30, 49, 50, 90)]
  np.testing.assert_allclose(rates, [0.005, 0.025, 0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005], rtol=1e-6)
