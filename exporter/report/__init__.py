"""Stage 7, report: what every stage measured, for machines and for people.

Enters: the report dict the API grows stage by stage, the artifacts, the PyTorch reference. Leaves:
`report.json` / `report.md` (`files`), the stage table timed interleaved in one process
(`stage_table`, `stage_report`) and its chart `stages.png`.
"""
