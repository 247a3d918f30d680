-- Fan-out and split pushes: one parent row (what the caller sent; idempotency, history and
-- callbacks are on it) and one row per part (one Umeng call's worth: one app, at most 500
-- tokens or aliases). Parts are asynchronous pushes like any other: the delivery worker
-- claims, sends, retries and polls them. The parent stays `pending` until every part has
-- its outcome, then takes the derived status: accepted, partial, failed, unknown or
-- withdrawn (`partial` is the gateway's own state, not one of Umeng's task states).

alter table pushes
    add column parent_id text,        -- a part: its parent's id
    add column part_no   integer,     -- a part: 1, 2, ... within its parent
    add column parts     integer,     -- a parent: how many parts it has
    add column audience  integer;     -- a part: tokens or aliases it addresses (null: a filter)

create index pushes_parent_idx on pushes (parent_id, part_no) where parent_id is not null;
-- Parents whose outcome is not settled yet (the worker's upkeep settles them).
create index pushes_open_parents_idx on pushes (created_at)
    where parts is not null and status = 'pending';
-- Parents that wait as a whole (held until send_at, or for every member's quota window),
-- their parts in `outbox` until they are released.
create index pushes_due_parents_idx on pushes (next_attempt_at)
    where parts is not null
      and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota');

create or replace trigger pushes_callback_event
    after update of status on pushes
    for each row
    when (new.callback_url is not null
          and new.status is distinct from old.status
          and new.status in ('accepted', 'failed', 'unknown', 'done', 'send_failed',
                             'cancelled', 'expired', 'no_match', 'task_lost', 'withdrawn',
                             'partial'))
    execute function umgw_callback_event();
