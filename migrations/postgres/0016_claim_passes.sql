-- A delivery claim locks only the pushes it can take, and takes them with one update.
--
-- The claim of 0014 read and locked up to four times each app's free slots (`for update
-- skip locked`), so that pushes it could not take (past their deadline, waiting for a
-- quota window) did not leave slots empty, then took each push with an update of its own.
-- With an 80 ms upstream a claim holds one or two pushes: it locked four to eight rows (a
-- WAL record each) and kept them from other replicas' claims until it committed, and ran
-- one update, and one executor over `pushes` and all its indexes, per push taken.
--
-- Now a claim reads in passes. The first reads and locks as many pushes of each app as
-- it may take; a second, from where the first stopped, reads three times what is still
-- free for an app whose first pass met pushes it could not take (at most four times the
-- slots in all, as before). The pushes taken are marked `pending` by one update at the
-- end. Until then a push taken for a quota slot already has its window, so a later row of
-- the same bucket in the same claim does not count it as an older push still waiting.
--
-- Same signature, columns and answers as 0014 (the store tests check each case), so a
-- replica of the previous version calls this one during a rolling upgrade.
-- `enable_sort = off` and `jit = off` stay (the store tests check every version).

create or replace function umgw_claim_deliveries(
    p_limit      integer,
    p_lease_ms   bigint,
    p_apps       text[],
    p_appkeys    text[],
    p_app_limits integer[],
    p_due_from   timestamptz[]
)
returns table (
    id text, claims integer, lease_until timestamptz, app text, appkey text, cast_type text,
    task_class boolean, production_mode boolean, out_biz_no text, outbox jsonb,
    attempts jsonb, created_at timestamptz, deliver_by timestamptz, quota_kind text,
    quota_wait boolean, parent_id text, due_at timestamptz
)
language plpgsql
set enable_sort = off
set jit = off
as $$
#variable_conflict use_column
declare
    r          record;
    v_n        integer := greatest(coalesce(array_length(p_apps, 1), 0), 1);
    v_taken    integer[] := array_fill(0, array[v_n]);
    -- Per app, in the current pass: rows to read, rows read, rows read and not taken.
    v_ask      integer[] := array_fill(0, array[v_n]);
    v_read     integer[] := array_fill(0, array[v_n]);
    v_missed   integer[] := array_fill(0, array[v_n]);
    -- Per app: the queue key of the last row read, where the next pass starts.
    v_at       timestamptz[] := array_fill(null::timestamptz, array[v_n]);
    v_created  timestamptz[] := array_fill(null::timestamptz, array[v_n]);
    v_last     text[] := array_fill(null::text, array[v_n]);
    v_ids      text[] := '{}';
    v_idx      integer;
    v_pass     integer := 0;
    v_more     boolean;
    v_epoch    double precision := extract(epoch from now());
    v_window   bigint;
    v_used     integer;
    v_head     timestamptz;
    v_wait     timestamptz;
    v_older    integer;
    v_free     integer;
begin
    loop
        v_pass := v_pass + 1;
        for i in 1 .. coalesce(array_length(p_apps, 1), 0) loop
            if v_pass = 1 then
                v_ask[i] := greatest(least(p_app_limits[i], p_limit), 1);
            elsif v_missed[i] > 0 and v_read[i] = v_ask[i]
                  and v_taken[i] < p_app_limits[i] then
                v_ask[i] := 3 * (least(p_app_limits[i], p_limit) - v_taken[i]);
            else
                v_ask[i] := 0;
            end if;
        end loop;
        v_read := array_fill(0, array[v_n]);
        v_missed := array_fill(0, array[v_n]);

        for r in
            select d.*, c.i
              from unnest(p_apps, p_appkeys, v_ask, p_due_from, v_at, v_created, v_last)
                   with ordinality as c(app, appkey, ask, due_from, after_at, after_created,
                                        after_id, i)
              cross join lateral (
                    select p.id, p.app, p.status, p.appkey, p.quota_kind, p.quota_limit,
                           p.quota_unit, p.quota_window, p.quota_refunded, p.quota_wait,
                           p.deliver_by, p.created_at, p.deliver_claims, p.next_attempt_at
                      from pushes p
                     where c.ask > 0
                       and p.app = c.app and p.appkey = c.appkey
                       and p.status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
                       and p.next_attempt_at <= now()
                       and p.next_attempt_at >= coalesce(c.due_from, '-infinity')
                       and (p.next_attempt_at, p.created_at, p.id)
                           > (coalesce(c.after_at, '-infinity'),
                              coalesce(c.after_created, '-infinity'), coalesce(c.after_id, ''))
                     order by p.next_attempt_at, p.created_at, p.id
                     limit c.ask
                       for update of p skip locked) d
             order by d.next_attempt_at, d.created_at, d.id
        loop
            v_idx := r.i::integer;
            v_read[v_idx] := v_read[v_idx] + 1;
            -- The rows of each app come in queue order: the last one read is the largest.
            if v_at[v_idx] is null
               or (r.next_attempt_at, r.created_at, r.id)
                  > (v_at[v_idx], v_created[v_idx], v_last[v_idx]) then
                v_at[v_idx] := r.next_attempt_at;
                v_created[v_idx] := r.created_at;
                v_last[v_idx] := r.id;
            end if;
            if cardinality(v_ids) >= p_limit or v_taken[v_idx] >= p_app_limits[v_idx] then
                continue;
            end if;

            if r.deliver_by is not null and r.deliver_by <= now() then
                v_missed[v_idx] := v_missed[v_idx] + 1;
                with f as (
                    update pushes p
                       set status = 'failed',
                           error_code = case when r.status = 'awaiting_quota'
                                             then 'quota_wait_expired' else 'delivery_expired' end,
                           error_msg = case when r.status = 'awaiting_quota'
                               then 'no quota slot came free before the push''s deadline'
                               else 'the push could not be sent before its deadline' end,
                           http_status = case when r.status = 'awaiting_quota' then 429 else 504 end,
                           quota_refunded = p.quota_refunded or p.quota_window is not null,
                           outbox = null, next_attempt_at = null,
                           finished_at = now(), updated_at = now()
                     where p.id = r.id
                 returning p.appkey, p.quota_kind, p.quota_window, r.quota_refunded as was_refunded
                )
                update quota_counters c
                   set used = greatest(c.used - 1, 0)
                  from f
                 where not f.was_refunded and f.quota_window is not null
                   and c.appkey = f.appkey and c.kind = f.quota_kind
                   and c.window_start = f.quota_window;
                continue;
            end if;

            if r.quota_kind is not null and (r.quota_window is null or r.quota_refunded) then
                v_window := (floor((v_epoch + 28800) / r.quota_unit) * r.quota_unit - 28800)::bigint;
                v_wait := least(to_timestamp(v_window + r.quota_unit), coalesce(r.deliver_by, 'infinity'));
                -- An older push of the bucket, due, that another claim holds (a lock this
                -- claim's key share cannot take) is about to take a slot: this one does not
                -- overtake it, and stays as it is for a later claim.
                with older as (
                    select q.id
                      from pushes q
                     where q.status in ('awaiting_send', 'awaiting_send_at')
                       and q.quota_kind is not null
                       and q.appkey = r.appkey and q.quota_kind = r.quota_kind
                       and (q.created_at, q.id) < (r.created_at, r.id)
                       and q.next_attempt_at <= now()
                       and (q.quota_window is null or q.quota_refunded)
                ), free as (
                    select p.id
                      from pushes p
                     where p.id in (select id from older)
                       for key share of p skip locked
                )
                select (select count(*) from older), (select count(*) from free)
                  into v_older, v_free;
                if v_free < v_older then
                    v_missed[v_idx] := v_missed[v_idx] + 1;
                    continue;
                end if;
                -- First come, first served: behind an older push waiting for this bucket.
                select min(q.next_attempt_at) into v_head
                  from pushes q
                 where q.status = 'awaiting_quota' and q.appkey = r.appkey
                   and q.quota_kind = r.quota_kind
                   and (q.created_at, q.id) < (r.created_at, r.id);
                if v_head is not null then
                    v_used := null;
                    v_wait := greatest(v_head, now());
                else
                    v_used := umgw_take_slot(r.appkey, r.quota_kind, v_window, r.quota_limit);
                end if;
                if v_used is null then
                    v_missed[v_idx] := v_missed[v_idx] + 1;
                    if r.quota_wait or r.deliver_claims > 0 then
                        update pushes p
                           set status = 'awaiting_quota', next_attempt_at = v_wait,
                               updated_at = now()
                         where p.id = r.id;
                    else
                        update pushes p
                           set status = 'failed', error_code = 'quota_exhausted',
                               error_msg = 'the ' || r.quota_kind || ' quota window was full when the push was due',
                               http_status = 429, outbox = null, next_attempt_at = null,
                               finished_at = now(), updated_at = now()
                         where p.id = r.id;
                    end if;
                    continue;
                end if;
                update pushes p
                   set quota_window = v_window, quota_refunded = false
                 where p.id = r.id;
            end if;

            v_taken[v_idx] := v_taken[v_idx] + 1;
            v_ids := v_ids || r.id;
        end loop;

        exit when v_pass >= 2 or cardinality(v_ids) >= p_limit;
        v_more := false;
        for i in 1 .. coalesce(array_length(p_apps, 1), 0) loop
            v_more := v_more or (v_missed[i] > 0 and v_read[i] = v_ask[i]
                                 and v_taken[i] < p_app_limits[i]);
        end loop;
        exit when not v_more;
    end loop;

    return query
        update pushes p
           set status = 'pending', deliver_claims = p.deliver_claims + 1,
               deliver_lease_until = now() + p_lease_ms * interval '1 millisecond',
               updated_at = now()
         where p.id = any (v_ids)
     returning p.id, p.deliver_claims, p.deliver_lease_until, p.app, p.appkey,
               p.cast_type, p.task_class, p.production_mode, p.out_biz_no, p.outbox,
               p.attempts, p.created_at, p.deliver_by, p.quota_kind, p.quota_wait,
               p.parent_id, p.next_attempt_at;
end
$$;
