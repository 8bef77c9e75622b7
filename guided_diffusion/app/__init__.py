"""The application: the end-to-end demo (``demo``), its Markdown report and README figures
(``demo_report``) and the shipped model folders (``pretrained``).

Nothing is imported here: each module is imported by its own name.
"""
