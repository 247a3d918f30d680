-- Asynchronous delivery (see the PostgreSQL migration of the same number for the states).
-- Times are unix milliseconds.

alter table pushes add column delivery text;            -- null: synchronous; 'async'
alter table pushes add column outbox text;              -- JSON, until the push is final
alter table pushes add column next_attempt_at integer;
alter table pushes add column send_at integer;
alter table pushes add column deliver_by integer;
alter table pushes add column deliver_lease_until integer;
alter table pushes add column deliver_claims integer not null default 0;
alter table pushes add column quota_wait integer not null default 0;
alter table pushes add column quota_unit integer;

create index pushes_due_idx on pushes (next_attempt_at, created_at, id)
    where status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota');
create index pushes_quota_wait_idx on pushes (appkey, quota_kind, created_at)
    where status = 'awaiting_quota';
create index pushes_delivering_idx on pushes (deliver_lease_until)
    where status = 'pending' and delivery is not null;

-- Local cancel (withdrawn) is a final state with an event, like the others.
drop trigger pushes_callback_event;
create trigger pushes_callback_event
    after update of status on pushes
    for each row
    when new.callback_url is not null
         and new.status is not old.status
         and new.status in ('accepted', 'failed', 'unknown', 'done', 'send_failed',
                            'cancelled', 'expired', 'no_match', 'task_lost',
                            'withdrawn')
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
