"""The application floor: the command line, the stage table, evaluation, the demo, the report, Hub push, plan.

Only this package knows every stage; nothing below imports it."""
