-- Fan-out and split pushes (see the PostgreSQL migration of the same number).

alter table pushes add column parent_id text;
alter table pushes add column part_no integer;
alter table pushes add column parts integer;
alter table pushes add column audience integer;

create index pushes_parent_idx on pushes (parent_id, part_no) where parent_id is not null;
create index pushes_open_parents_idx on pushes (created_at)
    where parts is not null and status = 'pending';
-- Parents that wait as a whole (held until send_at, or for every member's quota window),
-- their parts in `outbox` until they are released.
create index pushes_due_parents_idx on pushes (next_attempt_at)
    where parts is not null
      and status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota');

drop trigger pushes_callback_event;
create trigger pushes_callback_event
    after update of status on pushes
    for each row
    when new.callback_url is not null
         and new.status is not old.status
         and new.status in ('accepted', 'failed', 'unknown', 'done', 'send_failed',
                            'cancelled', 'expired', 'no_match', 'task_lost',
                            'withdrawn', 'partial')
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
