-- Signed callbacks: the push's callback_url (from the stored request, so admission is
-- unchanged) and one event per (push, final state), written by a trigger in the same
-- statement as the state change, so an event exists exactly when its state was committed.
-- Times are unix milliseconds.
--
-- An event is due when it is `pending` and next_attempt_at has passed. A claim moves
-- next_attempt_at to the lease's end and counts the attempt, so an event whose worker died
-- is due again once the lease runs out; `attempts` is the claim's fencing token.

alter table pushes add column callback_url text
    generated always as (json_extract(request, '$.callback_url')) virtual;

create table callback_events (
    id               text    primary key,                -- evt_<push id>_<state>
    push_id          text    not null references pushes (id) on delete cascade,
    event_type       text    not null,                   -- push.<state>
    client           text    not null,                   -- whose secret signs it
    url              text    not null,
    data             text    not null,                   -- the push view at the state change
    state            text    not null default 'pending', -- pending, delivered, gave_up
    attempts         integer not null default 0,
    attempt_log      text    not null default '[]',      -- at most callbacks.max_attempts
    next_attempt_at  integer not null,
    created_at       integer not null,
    finished_at      integer,
    unique (push_id, event_type)
);

create index callback_events_due_idx on callback_events (next_attempt_at)
    where state = 'pending';

create trigger pushes_callback_event
    after update of status on pushes
    for each row
    when new.callback_url is not null
         and new.status is not old.status
         and new.status in ('accepted', 'failed', 'unknown', 'done', 'send_failed',
                            'cancelled', 'expired', 'no_match', 'task_lost')
begin
    insert or ignore into callback_events (id, push_id, event_type, client, url, data,
                                           next_attempt_at, created_at)
    values ('evt_' || new.id || '_' || new.status, new.id, 'push.' || new.status, new.client,
            new.callback_url,
            json_object('id', new.id, 'app', new.app, 'type', new.cast_type,
                        'status', new.status,
                        'production_mode', json(case when new.production_mode
                                                     then 'true' else 'false' end),
                        'out_biz_no', new.out_biz_no, 'msg_id', new.msg_id,
                        'task_id', new.task_id, 'file_id', new.file_id),
            cast((julianday('now') - 2440587.5) * 86400000 as integer),
            cast((julianday('now') - 2440587.5) * 86400000 as integer));
end;
