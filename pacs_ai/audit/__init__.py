"""The audit trail: who sent what, who looked at or reviewed what, what went where,
configuration changes and security alerts. Append-only in the database, exportable, and
optionally sent as IHE ATNA syslog messages in the DICOM audit message format (PS3.15 A.5).
"""
