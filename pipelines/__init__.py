"""medloop's stage logic: plain functions with typed inputs, one module per stage.

Nothing in this package imports Prefect or knows it is scheduled; ``python -m pipelines.<stage>``
is each DVC stage's command.
"""
