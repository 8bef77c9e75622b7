"""The application: the end-to-end demo (``demo_settings``: its flags and presets, light; ``demo``:
the run; ``demo_report``: its Markdown report and README figures) and the shipped model folders
(``pretrained``).

Nothing is imported here: each module is imported by its own name.
"""
