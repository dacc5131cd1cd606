"""The experiment engine: recipe → run directory → sweep directory → report.

``recipe`` (hyper-parameters as data) · ``layout`` (every file name of a run and a sweep) · ``seeding`` (hashed seed
streams) · ``loaders`` (data sets, sampler, transforms) · ``model`` (the model a run starts from) · ``train`` (the
loop) · ``checkpoint`` (atomic save and resume) · ``stopping`` (divergence, SIGTERM and Ctrl-C) · ``sweep`` (the grid
runner) · ``study`` (protocols of sweeps) · ``report``, ``tables`` and ``power`` (tables and statistics) ·
``analysis`` (γ analyses) · ``plots`` · ``cli`` (the scripts).
Nothing here is imported by ``import timm_bninit``: the plugin stays light.
"""
