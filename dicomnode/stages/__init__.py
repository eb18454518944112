"""The stages of one study version's journey: convert, preprocess, infer, report, dispatch."""
