-- Task-status polling: when the poller next asks Umeng about a task-class push, how often it
-- has asked, and the lease of the replica asking right now.
--
-- A task is due when it is unfinished (accepted, queued, sending, scheduled), has a task_id,
-- is not leased, and either next_poll_at has passed or it was never polled and was accepted
-- long enough ago. next_poll_at null with poll_count > 0 means the poller gave up on it.

alter table pushes add column next_poll_at timestamptz;
alter table pushes add column poll_locked_until timestamptz;
alter table pushes add column poll_count integer not null default 0;

-- Only unfinished tasks are in this index, so the poller's scan stays small however long
-- history grows.
create index pushes_task_poll_idx on pushes (next_poll_at)
    where task_id is not null and status in ('accepted', 'queued', 'sending', 'scheduled');

-- The retention purge deletes uploads by age.
create index uploads_created_idx on uploads (created_at);
