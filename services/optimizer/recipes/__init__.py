"""The quantization recipes, by name."""

from __future__ import annotations

from services.errors import InvalidParameterError
from services.optimizer.recipes import fp8, gptq, int4, int8, int8_all, w8a8
from services.optimizer.recipes.base import Recipe

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (int8.RECIPE, int8_all.RECIPE, w8a8.RECIPE, int4.RECIPE, gptq.INT8, gptq.INT4, fp8.RECIPE)
}


def get_recipe(name: str) -> Recipe:
    recipe = RECIPES.get(name)
    if recipe is None:
        raise InvalidParameterError("recipe", name, f"known recipes: {', '.join(RECIPES)}")
    if not recipe.exercised:
        raise InvalidParameterError("recipe", name, "not exercised on this hardware (needs a GPU with fp8)")
    return recipe


__all__ = ["RECIPES", "Recipe", "get_recipe"]
