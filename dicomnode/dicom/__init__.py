"""The DICOM network edge, named as pynetdicom names its layers: receive (``scp``), send (``scu``), status classes
(``status``: transient vs permanent), SOP classes (``sop``), and what the node changes in pynetdicom (``shim``).
Imports only the bottom floor (config, logs, handoff), the spool and the index. docs/receive.md describes it."""
