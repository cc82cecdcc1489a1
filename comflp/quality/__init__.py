"""The search-quality study: every proposal of one P evaluated on a model, every score ranked
against those CERs (``study``), the study across models (``robustness``), its report and plots
(``report``), the two commands' stages (``stage``: ``bin/search_quality.py`` and
``bin/search_quality_summary.py``) and the decoder measures that decode (``decoder``:
``bin/decoder_scores.py``, across models ``bin/decoder_scores_summary.py``)."""
