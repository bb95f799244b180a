"""``dstune explain``: pictures of what a model or run does with one prompt.

- ``attention``: attention weights of chosen layers and heads (eager attention: SDPA returns none);
- ``attribution``: gradient x input per input token, towards the predicted token or label;
- ``lens``: the logit lens, the top next-token candidates after each decoder layer;
- ``render``: the PNG and HTML files; ``run``: loading, tokenizing and writing them all;
- ``options``: each choice's default and description, from which ``cli`` makes the --help.

Nothing heavy is imported here: cli.py imports ``explain.cli`` (and so this package) at start-up to
register the command.
"""
