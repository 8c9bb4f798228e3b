"""Your own catalogue as a CSV manifest: columns path,label and optionally split (train,
validation, test), is_query and is_gallery (separate query and gallery sets, as In-Shop).
Without a split column the first half of the sorted classes trains, the rest tests.

    python train.py --dataset=csv --data_dir=/path/to/manifest.csv --model_dir=runs/catalogue

The folder preset's recipe (the paper's, with an ImageNet-pretrained InceptionV3); on a CPU, try
`--backbone=mobilenet_v2 --image_size=160 --resize_size=182`.
"""

from dvml_tf.configs import folder


def get_config():
    return folder.get_config().replace(config="csv", dataset="csv")
