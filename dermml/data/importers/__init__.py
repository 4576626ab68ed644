"""Importers: public dataset layouts -> manifests that reference, never copy, the source files.

Each importer lists the source once, records every sample it finds (a later validation stage judges
missing masks or unreadable images), and fails only when the layout cannot be read at all. One
module per format family; ``stage`` holds the registry and ``import_dataset``.
"""

from dermml.data.importers.coco import import_coco
from dermml.data.importers.common import DatasetImportError, SourceTree, image_facts, list_source
from dermml.data.importers.dermsynth3d import import_dermsynth3d
from dermml.data.importers.folders import import_classification, import_segmentation
from dermml.data.importers.isic import import_isic2018
from dermml.data.importers.ph2 import import_ph2, parse_ph2_labels, ph2_labels_from_table
from dermml.data.importers.stage import (
    GROUP_AUTO,
    GROUP_NEAR_DUPLICATES,
    GROUP_NONE,
    IMPORTERS,
    apply_metadata,
    get_importer,
    import_dataset,
    importer_options,
    manifest_uri_for,
    split_units,
)
from dermml.data.importers.stylegan import import_stylegan_zip

__all__ = [
    "GROUP_AUTO", "GROUP_NEAR_DUPLICATES", "GROUP_NONE", "IMPORTERS", "DatasetImportError",
    "SourceTree", "apply_metadata", "get_importer", "image_facts", "import_classification",
    "import_coco", "import_dataset", "import_dermsynth3d", "import_isic2018", "import_ph2",
    "import_segmentation", "import_stylegan_zip",
    "importer_options", "list_source", "manifest_uri_for", "parse_ph2_labels",
    "ph2_labels_from_table", "split_units",
]
