"""StreetHazards (anomaly-seg release): CARLA road scenes with anomalous objects in test.

Layout (the original ObsNet README's, ``.odgt`` paths relative to the root)::

    StreetHazards/
        images/{training,validation,test}/t*/N.png          RGB PNG 1280×720
        annotations/{training,validation,test}/t*/N.png     raw ids 1..14
        train.odgt (or training.odgt)  validation.odgt  test.odgt

Raw label values 1..14 become ids 0..13 (0 unlabeled .. 12 traffic sign, 13 anomaly);
a raw 0 becomes the ignore id. See ``obsnet.data.odgt`` for the split files.
"""
from obsnet.data.odgt import OdgtDataset


class StreetHazard(OdgtDataset):
    """StreetHazards: splits ``train`` / ``validation`` / ``test`` (anomalies in test)."""

    # The anomaly-seg scripts write training.odgt; the original ObsNet expects train.odgt.
    split_files = {"train": ("train.odgt", "training.odgt"),
                   "validation": ("validation.odgt",),
                   "test": ("test.odgt",)}
    splits = tuple(split_files)
    default_spec = "StreetHazard"
