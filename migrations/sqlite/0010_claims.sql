-- The delivery claim reads each app's queue through its own ordered index and stops at
-- that app's limit (see the PostgreSQL migration 0011): one ordered scan of every app's
-- due pushes walked past all of the other apps' pushes for an app with nothing due. Only
-- waiting pushes are in it, so a finished push costs it nothing.
create index pushes_app_due_idx on pushes (app, next_attempt_at, created_at, id)
    where status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota');
drop index pushes_due_idx;
