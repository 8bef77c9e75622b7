"""The infrastructure under the port and the application: errors and the command-line contract
(``errors``), file I/O (``fileio``), typed settings and their validation (``config``), resumable
outputs (``completion``), run-folder locks (``runlock``), launcher ranks (``launcher``), precision
(``precision``), lazy package attributes (``lazy``), safe checkpoint files (``checkpoints``),
plotting (``plotting``) and the training run's pieces behind ``train_util`` (``train_config``,
``train_state``, ``train_loop``, ``checkpoint_folder``).

Nothing is imported here: each module is imported by its own name, so light commands load only
what they use.
"""
