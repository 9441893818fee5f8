"""MergeLab's Gradio panels; each module builds one panel on top of the `merging` library."""
