"""The radiologist's worklist: priority from rules and findings, review state, history.

- :mod:`.findings` reads the findings a job recorded and names each one as its SR does;
- :mod:`.priority` recomputes a study's priority and one-line findings summary;
- :mod:`.queries` is the worklist query and the study detail;
- :mod:`.reviews` records accept / reject / comment and derives the study's review state;
- :mod:`.preview` draws a key slice with the job's segmentation over it.

Everything here reads the database (and, for previews, the spool and result files) only,
so a worker on another machine can refresh a study with the same configuration.
"""
