"""ObsNet + Local Adversarial Attacks (Besnier et al., ICCV 2021): an observer network that
predicts, per pixel, whether a frozen segmentation network is wrong.

Laid out as data flows: ``obsnet.data`` (datasets, loaders, generated data), ``obsnet.models``
(SegNet, DeepLabv3+, observers, registry, checkpoints), ``obsnet.attacks``, ``obsnet.train``,
``obsnet.methods`` (uncertainty methods), ``obsnet.metrics``, ``obsnet.evaluate``,
``obsnet.stages`` and ``obsnet.cli`` (the command line of ``python main.py``). Importing the
package imports none of them."""

__version__ = "0.1.0"
