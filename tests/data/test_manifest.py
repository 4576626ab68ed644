"""Manifest files: extra columns keep their types."""

import pandas as pd

from dermml.data.manifest import read_manifest, write_manifest


def test_extra_columns_are_typed_by_their_present_values(tmp_path):
    """Two manifests concatenated leave NaN in the columns only one of them has: a text column
    whose first value is missing must stay text (it failed as 'not a double')."""
    import numpy as np

    df = pd.DataFrame({"sample_id": ["a", "b", "c"], "image_uri": ["a.png", "b.png", "c.png"],
                       "model_version": [np.nan, "dermml-gan/1", None],
                       "ita": [12.5, np.nan, -3.0]})
    uri = str(tmp_path / "m.parquet")
    write_manifest(df, uri)
    back = read_manifest(uri).df
    assert back["model_version"].tolist()[1] == "dermml-gan/1"
    assert back["model_version"].isna().tolist() == [True, False, True]
    assert back["ita"].tolist()[0] == 12.5
