"""The studies: data of a study cell, imputers, sweeps, scores, tables and figures.

- :mod:`labkit.studies.cells`           the data of one (dataset, mask kind, seed) cell, fixed masks
- :mod:`labkit.studies.imputers`        the missing-data methods (``METHODS``) and their cached auxiliaries
- :mod:`labkit.studies.classification`  the classification sweep (notebook 02)
- :mod:`labkit.studies.classification_tables`  its tables (Table-1 pivot, paired differences, two
                                        budgets side by side) and figures
- :mod:`labkit.studies.density`         the DMFA / MFA / ACFlow density study (notebook 01)
- :mod:`labkit.studies.density_checkpoints`  its checkpoints: reused only when trained with the same settings
- :mod:`labkit.studies.density_figures` its inpainting grids and training curves
- :mod:`labkit.studies.density_sweep`   its DMFA runs as engine cells (a grid, ``density.csv``)
- :mod:`labkit.studies.wae`             the WAE study (notebook 03)
- :mod:`labkit.studies.wae_features`    its feature network (Fréchet distances)
- :mod:`labkit.studies.wae_report`      its tables and figures
- :mod:`labkit.studies.timing`          the timing study (notebook 04, ``./lab study timing``)
- :mod:`labkit.studies.draw`            draw a mask: strokes, presets, panels, rendering (notebook 05)
- :mod:`labkit.studies.draw_app`        draw a mask: the models and the widget app
- :mod:`labkit.studies.reporting`       generated blocks in Markdown files, shared by every study
- :mod:`labkit.studies.engine`          the bookkeeping every study shares (cell keys, result files,
                                        caches, executors: ``engine_keys``, ``store``, ``executors``)
- :mod:`labkit.studies.merge`           two copies of one study's results merged (rows brought home
                                        from another machine)
"""
