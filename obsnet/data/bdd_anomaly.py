"""BDD-Anomaly (anomaly-seg): BDD100K segmentation with train / motorcycle / bicycle held out.

Layout: the ``.odgt`` files in the root, their paths starting with ``seg/``::

    BDD/
        seg/images/{train,val}/NAME.jpg                    JPEG
        seg/train_labels/{train,val}/NAME_train_id.png     raw ids 1..20
        train.odgt  validation.odgt  test.odgt (or anom.odgt)

The original ObsNet README puts the data one level down, in ``BDD/bdd100k/seg/...``, with
the odgt files in ``BDD/``: an odgt path is therefore resolved against the root first, then
against ``root/bdd100k/``. Raw values minus 1 give 0 other, 1 road .. 16 bus and the
anomalies 17 train, 18 motorcycle, 19 bicycle; a raw 0 becomes the ignore id.
"""
from obsnet.data.odgt import OdgtDataset


class BddAnomaly(OdgtDataset):
    """BDD-Anomaly: splits ``train`` / ``validation`` / ``test`` (anomalies in test)."""

    # anomaly-seg names the test split anom.odgt; the original README spells valiadation.
    split_files = {"train": ("train.odgt",),
                   "validation": ("validation.odgt", "val.odgt", "valiadation.odgt"),
                   "test": ("test.odgt", "anom.odgt")}
    splits = tuple(split_files)
    bases = ("", "bdd100k")
    default_spec = "BddAnomaly"
