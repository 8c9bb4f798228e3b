"""Your own catalogue: a folder with one sub-folder of images per class (or train/ and test/
folders of class sub-folders). The first half of the sorted class names trains, the rest tests.

    python train.py --dataset=folder --data_dir=/path/to/catalogue --model_dir=runs/catalogue

The paper's recipe with an ImageNet-pretrained InceptionV3; on a CPU, try
`--backbone=mobilenet_v2 --image_size=160 --resize_size=182`.
"""

from dvml_tf.configs import paper


def get_config():
    return paper.paper_recipe(
        config="folder", dataset="folder", steps=5000, eval_every=1000, validation_classes=0
    )
