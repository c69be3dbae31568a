"""mlx-lm's entry point for this titans_mac model directory, written by titans_mlx.io.save_model.

config.json names this file ("model_file"), so mlx-lm builds the model with the classes imported below:

    python -m mlx_lm generate --model DIR --trust-remote-code --prompt "..."

It only imports them from the titans-mlx package, which must be installed where mlx-lm runs (`pip install -e .`
in the titans-mlx repository). titans_mlx.load never runs this file; it builds the model from model_type.
"""

from titans_mlx.mac import Model, ModelArgs  # noqa: F401
